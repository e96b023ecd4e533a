"""What a new user meets one step past the README: each gives the right answer or a
clear error, on both backends (issue "No silent wrong answers")."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

PROMPT = "The capital of France is"


def _models(hf_models, vllm_models, backend):
    return hf_models("llama") if backend == "hf" else vllm_models("llama")


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_steering_with_nan_is_refused_and_the_model_still_answers(backend, hf_models, vllm_models):
    model = _models(hf_models, vllm_models, backend)
    vector = torch.zeros(model.hidden_size)
    vector[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite values .* at index 3"):
        with model.trace(PROMPT):
            model.steer(1, vector, scale=2.0)
            model.next_token_probs.save()
    with pytest.raises(ValueError, match="finite scale"):
        with model.trace(PROMPT):
            model.steer(1, torch.zeros(model.hidden_size), scale=float("inf"))
            model.next_token_probs.save()
    with model.trace(PROMPT):
        probs = model.next_token_probs.save()
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_a_layer_past_the_last_is_an_index_error_naming_the_range(backend, hf_models, vllm_models):
    model = _models(hf_models, vllm_models, backend)
    n = model.num_layers
    with pytest.raises(IndexError, match=rf"layers_output\[{n}\]: this model has {n} layers"):
        with model.trace(PROMPT):
            model.layers_output[n].save()


def test_steer_takes_the_dsl_names_and_the_old_ones_warn(hf_models):
    from nnterp.interventions import steer

    model = hf_models("llama")
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    with model.trace(PROMPT):
        model.steer(1, vector=vector, scale=3.0)
        new = model.next_token_probs.save()
    with pytest.warns(DeprecationWarning, match=r"steering_vector=.*call it vector="):
        with model.trace(PROMPT):
            model.steer(1, steering_vector=vector, scale=3.0)
            old_vector = model.next_token_probs.save()
    with pytest.warns(DeprecationWarning, match=r"factor=.*call it scale="):
        with model.trace(PROMPT):
            model.steer(1, vector, factor=3.0)
            old_factor = model.next_token_probs.save()
    assert torch.equal(new, old_vector) and torch.equal(new, old_factor)
    with pytest.raises(TypeError, match="only scale="):
        with model.trace(PROMPT):
            model.steer(1, vector, scale=2.0, factor=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        by_scale = steer(model, PROMPT, 1, vector, scale=3.0, max_tokens=3)
    with pytest.warns(DeprecationWarning, match=r"steer\(factor=\.\.\.\) is deprecated; call it scale="):
        by_factor = steer(model, PROMPT, 1, vector, factor=3.0, max_tokens=3)
    assert by_scale.tokens == by_factor.tokens


def test_empty_inputs_and_typos_get_errors_that_say_what_to_do(hf_models):
    from nnterp.activations import collect_token_activations_batched

    model = hf_models("llama")
    with pytest.raises(ValueError, match="list of prompts is empty"):
        with model.trace([]):
            model.logits.save()
    with pytest.raises(ValueError, match="the prompt is empty"):
        with model.trace(""):
            model.logits.save()
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        with model.trace(["Hi", ""]):
            model.logits.save()
    with pytest.raises(ValueError, match="no prompts given"):
        collect_token_activations_batched(model, [], progress=False)
    with pytest.raises(AttributeError, match="did you mean 'layers_output'"):
        model.layers_outputs
    # raw nnsight paths still fall through
    assert model.model.layers[0] is not None


def _sampled(model, prompts, seed):
    from nnterp.dsl import Read, Sampling, run

    return run(Read("layers[0].output"), model, prompts,
               sampling=Sampling(max_tokens=6, temperature=1.0, seed=seed)).tokens


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm-batched", marks=[pytest.mark.vllm, pytest.mark.slow]),
                                     pytest.param("vllm-nnsight", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_a_seed_makes_the_run_reproducible_and_copies_of_a_prompt_still_differ(backend, hf_models, vllm_models):
    from backend_settings import executor

    model = _models(hf_models, vllm_models, backend.split("-")[0])
    prompts = [PROMPT] * 4
    with executor(model, backend.split("-")[1]) if backend.startswith("vllm") else contextlib.nullcontext():
        first, again, other = _sampled(model, prompts, 0), _sampled(model, prompts, 0), _sampled(model, prompts, 1)
    assert first == again
    assert len({tuple(t) for t in first}) == 4, first  # four copies, four samples
    assert first != other



@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_patching_from_another_prompt_aligns_positions_one_to_one(backend, hf_models, vllm_models):
    from nnterp.dsl import Patch, Read, Source, ValidationError, run

    model = _models(hf_models, vllm_models, backend)
    prompt, other = "The capital of France is", "The capital of Italy is"
    n = len(model.tokenizer(prompt)["input_ids"])
    assert n == len(model.tokenizer(other)["input_ids"])
    site = "layers[0].output"
    clean = run(Read(site, positions=None), model, prompt)[site][0]
    source = run(Read(site, positions=None), model, other)[site][0]
    span = run(Patch(site, source=Source(other, position=[1, 2, 3]), positions=[1, 2, 3])
               >> Read(site, positions=None, name="after"), model, prompt)["after"][0]
    torch.testing.assert_close(span[1:4], source[1:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(span[[0] + list(range(4, n))], clean[[0] + list(range(4, n))], atol=1e-5, rtol=0)
    # reversed lists pair in order: the source's token 3 goes to position 1
    swapped = run(Patch(site, source=Source(other, position=[3, 1]), positions=[1, 3])
                  >> Read(site, positions=None, name="after"), model, prompt)["after"][0]
    torch.testing.assert_close(swapped[1], source[3], atol=1e-5, rtol=0)
    every = run(Patch(site, source=Source(other, position=None), positions=None)
                >> Read(site, positions=None, name="after"), model, prompt)["after"][0]
    torch.testing.assert_close(every, source, atol=1e-5, rtol=0)
    # the forms with no single meaning are refused before anything runs
    for graph, match in ((Patch(site, source=Source(other), positions=None), "every position"),
                         (Patch(site, source=Source(other, position=[1, 2]), positions=[1, 2, 3]), "takes 2 tokens"),
                         (Patch(site, source=Source(other, position=None), positions=-1), "names only some")):
        with pytest.raises(ValidationError, match=match):
            run(graph, model, prompt)
    with pytest.raises(ValidationError, match="the source prompt has"):
        run(Patch(site, source=Source(other, position=None), positions=None), model, "Hello")


def test_a_hub_id_with_no_local_copy_and_no_hub_fails_at_once_naming_both(monkeypatch, tmp_path):
    import time

    from nnterp import StandardizedTransformer
    from nnterp.errors import ModelNotFoundError

    # the hub at a closed port on this machine: the request is refused at once, and no
    # traffic leaves the machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # straight to the closed port, never through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as caught:
        StandardizedTransformer("nnterp-tests/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "no copy in the Hugging Face cache" in message and "cannot be reached" in message
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        StandardizedTransformer("nnterp-tests/no-such-model")
    # a load that never asks the hub is not refused for it: the load itself decides
    from nnterp.bundled import find_loadable

    assert find_loadable("nnterp-tests/no-such-model", local_files_only=True) == "nnterp-tests/no-such-model"


@pytest.mark.vllm
@pytest.mark.slow
def test_a_quiet_engine_prints_no_log_lines_and_still_answers(vllm_models, capfd):
    capfd.readouterr()
    model = vllm_models("llama", quiet=True)  # an engine of its own, started here
    with model.trace(PROMPT):
        probs = model.next_token_probs.save()
    out, err = capfd.readouterr()
    noise = [line for line in (out + err).splitlines() if " INFO " in line or " WARNING " in line]
    assert noise == [], noise[:5]
    assert torch.isfinite(probs).all()
