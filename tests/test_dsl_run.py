"""Running DSL graphs: the same results on HF, on vLLM, and as hand-written nnsight code."""

from __future__ import annotations

import psutil
import pytest
import torch

from nnterp.dsl import (AttentionProbs, Grad, Graph, Lens, Patch, Read, Sampling, Source, Steer, ValidationError,
                        Zero, run)
from test_vllm_backend import TOKEN_RTOL, assert_close_per_token

PROMPTS = ["The capital of France is", "One, two, three,", "Hi there"]


def _vector(model, seed=0, scale=0.25):
    return scale * torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed))


def _graphs(model):
    v = _vector(model)
    return {
        "read": Read("layers[1].output") >> Read("mlps[0].output", positions=[0, -1])
        >> Read("attentions[2].output", positions=None) >> Read("logits"),
        "zero": Zero("mlps[1].output", positions=[-1]) >> Read("layers[2].output") >> Read("logits"),
        "patch": Patch("layers[1].output", value=v, positions=[1]) >> Read("layers[-1].output") >> Read("logits"),
        "steer": Steer(1, v, scale=2.0) >> Read("layers[2].output") >> Read("logits"),
        "lens": Lens() >> Lens(layers=[0, -1], positions=[-2, -1], name="two") >> Lens(top_k=5, name="top"),
    }


def _compare(got, want, what):
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{what}[{i}]")
        return
    assert got.shape == want.shape, what
    if got.dtype in (torch.int64, torch.int32):
        assert torch.equal(got, want), what
    else:
        # the per-token tolerance of the backend tests (HF and vLLM run different float32
        # kernels); a patched or zeroed stream drives SmolLM2 into states where float32
        # noise is a little larger (measured 6e-6 of the token scale after a patch, i.e.
        # 50 eps), hence 5e-5 (420 eps) rather than 2e-5 on CPU
        assert_close_per_token(got.float(), want.float(), what, token_rtol=max(TOKEN_RTOL, 5e-5))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "bundled"])
@pytest.mark.parametrize("kind", ["read", "zero", "patch", "steer", "lens"])
def test_every_node_gives_the_same_result_on_hf_and_vllm(family, kind, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    graph = _graphs(hf)[kind]
    want, got = run(graph, hf, PROMPTS), run(graph, vllm, PROMPTS)
    assert got.keys() == want.keys()
    for name in want.keys():
        if name == "top":  # top-k ids can swap on near-ties; compare the probabilities
            _compare(got[name][0], want[name][0], f"{family} {kind} {name}")
            continue
        _compare(got[name], want[name], f"{family} {kind} {name}")
    assert got.tokens == want.tokens


def test_read_shapes(hf_models):
    model = hf_models("llama")
    result = run(_graphs(model)["read"], model, PROMPTS)
    assert result["layers[1].output"].shape == (3, model.hidden_size)
    assert result["mlps[0].output"].shape == (3, 2, model.hidden_size)
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert [t.shape for t in result["attentions[2].output"]] == [(n, model.hidden_size) for n in lengths]
    assert result["logits"].shape == (3, model.vocab_size)
    lens = run(_graphs(model)["lens"], model, PROMPTS)
    assert lens["lens"].shape == (3, model.num_layers, model.vocab_size)
    assert lens["two"].shape == (3, 2, 2, model.vocab_size)
    assert lens["top"][0].shape == lens["top"][1].shape == (3, model.num_layers, 5)


def test_same_as_hand_written_nnsight(hf_models):
    model = hf_models("bundled")
    v = _vector(model)
    result = run(Steer(4, v) >> Read("layers[6].output") >> Lens(layers=[10]), model, PROMPTS)
    with torch.no_grad(), model.trace(PROMPTS):
        model.layers_output[4] = model.layers_output[4] + v
        h6 = model.layers_output[6][:, -1].save()
        h10 = model.layers_output[10][:, -1].save()
    lens10 = torch.softmax(model.project_on_vocab(h10), dim=-1)
    # the same kernels on the same batch as the hand-written trace: exact
    torch.testing.assert_close(result["layers[6].output"], h6, atol=0, rtol=0)
    torch.testing.assert_close(result["lens"][:, 0], lens10, atol=0, rtol=0)


def test_grad_and_attention_probs_match_hand_written_nnsight(hf_models):
    model = hf_models("llama", enable_attention_probs=True)
    target = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    result = run(AttentionProbs(1) >> Grad("layers[0].output", " Paris"), model, PROMPTS[0])
    with model.trace(PROMPTS[0]):
        h = model.layers_output[0]
        probs = model.attention_probabilities[1].save()
        logits = model.logits
        objective = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, target].sum()
        with objective.backward():
            grad = h.grad[:, -1].save()
    # the same forward and backward as the hand-written trace: exact
    torch.testing.assert_close(result["attention_probs[1]"][0], probs[0], atol=0, rtol=0)
    torch.testing.assert_close(result["grad:layers[0].output"], grad, atol=0, rtol=0)
    assert grad.abs().max() > 0


def test_lens_at_the_last_layer_is_the_next_token_distribution(hf_models):
    model = hf_models("bundled")
    result = run(Lens(layers=[-1]) >> Read("logits"), model, PROMPTS)
    # the lens unembeds the last position alone, the model all positions at once: a
    # matmul of another shape may reorder the float32 sums, moving a logit by δ ≤ 2**7 eps
    # of |logit| ≤ 32 (5e-4) and a probability p by at most 2δp: rtol 1e-3 (measured: 0)
    torch.testing.assert_close(result["lens"][:, 0], torch.softmax(result["logits"], dim=-1), atol=0, rtol=1e-3)


@pytest.mark.vllm
@pytest.mark.slow
def test_lens_then_steer_changes_later_layers_only_on_both_backends(hf_models, vllm_models):
    for model in (hf_models("bundled"), vllm_models("bundled")):
        clean = run(Lens(), model, PROMPTS)["lens"]
        steered = run(Lens(layers=all) >> Steer(12, _vector(model, scale=4.0)), model, PROMPTS)["lens"]
        diff = (steered - clean).abs().amax(dim=(0, 2))
        # the same prompts in the same batch: until the steer both passes are the same
        # float32 computation, exact
        assert torch.all(diff[:12] == 0), model.backend  # earlier layers, and layer 12 before the steer
        assert diff[12] == 0  # the lens sits before the steer at layer 12 in graph order
        assert torch.all(diff[13:] > 1e-4), model.backend  # the steer moves probabilities by ~0.1


def test_graph_order_at_one_site(hf_models):
    model = hf_models("llama")
    v = _vector(model, scale=1.0)
    result = run(Read("layers[1].output", name="before") >> Steer(1, v) >> Read("layers[1].output", name="after")
                 >> Zero("layers[1].output") >> Read("layers[1].output", name="zeroed"), model, PROMPTS)
    torch.testing.assert_close(result["after"], result["before"] + v, atol=0, rtol=0)  # the same addition
    assert torch.all(result["zeroed"] == 0)


def test_patch_from_a_source_prompt(hf_models):
    model = hf_models("bundled")
    source = "The capital of Italy is"
    patched = run(Patch("layers[8].output", source=Source(source, position=-1)) >> Read("layers[8].output"),
                  model, PROMPTS[0])
    original = run(Read("layers[8].output"), model, source)
    # the value read from the source prompt is written as is: exact
    torch.testing.assert_close(patched["layers[8].output"], original["layers[8].output"], atol=0, rtol=0)


def test_validation_reports_every_problem_before_running(hf_models):
    model = hf_models("llama")
    graph = Steer(1, torch.zeros(7)) >> Read("layers[9].output") >> Read("logits", name="x") >> Read("logits", name="x")
    with pytest.raises(ValidationError) as info:
        run(graph, model, PROMPTS)
    assert [p.node_index for p in info.value.problems] == [0, 1, 3]


def test_vllm_only_graphs_are_rejected_before_any_engine_starts(tiny_dir):
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    for node in (Grad("layers[0].output", 5), AttentionProbs(0)):
        with pytest.raises(ValidationError, match="hf"):
            run(node, tiny_dir("llama"), PROMPTS, backend="vllm")
    assert {p.pid for p in me.children(recursive=True)} - before == set()


@pytest.mark.vllm
@pytest.mark.slow
def test_generation_time_steering_moves_the_continuation_the_same_way(hf_models, vllm_models):
    hf = hf_models("bundled")
    target = hf.tokenizer(" London", add_special_tokens=False)["input_ids"][0]
    direction = hf.nnsight_model.lm_head.weight[target].detach().clone()
    direction = direction / direction.norm()
    sampling = Sampling(max_tokens=8)  # found by hand: layer 25, scale 80 turns " Paris" into " London"
    texts = {}
    for model in (hf, vllm_models("bundled")):
        clean = run(Read("logits"), model, PROMPTS[0], sampling=sampling)
        steered = run(Steer(25, direction, scale=80.0) >> Read("logits", steps="all"), model, PROMPTS[0],
                      sampling=sampling)
        assert clean.tokens[0].count(target) == 0
        assert steered.tokens[0].count(target) >= 2, (model.backend, steered.texts)
        # the steer acts at every generated step, not only on the prompt
        assert len(steered["logits"][0]) == 8
        texts[model.backend] = steered.tokens[0]
    assert texts["hf"] == texts["vllm"]


def test_a_position_a_prompt_lacks_is_a_problem_found_before_running(hf_models):
    model = hf_models("llama")
    prompts = ["The capital of France is", "Hi there"]
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    with pytest.raises(ValidationError) as info:
        run(Read("layers[0].output", positions=[0, 5]), model, prompts)
    (problem,) = info.value.problems
    assert problem.where == "nodes[0] Read.positions"
    assert f"prompts[0] ({lengths[0]} tokens)" in problem.what and f"prompts[1] ({lengths[1]} tokens)" in problem.what


def test_run_argument_problems_are_validation_errors_before_anything_runs(hf_models, tmp_path):
    model = hf_models("llama")
    with pytest.raises(ValidationError) as info:
        run(Grad("layers[0].output", 5) >> Steer(0, torch.full((model.hidden_size,), float("nan"))),
            model, "Hello", sampling=Sampling(max_tokens=3))
    assert [p.where for p in info.value.problems] == ["nodes[0] Grad", "nodes[1] Steer.vector"]
    with pytest.raises(ValidationError) as info:
        run(Read("logits"), model, "Hello", backend="vllm")
    assert info.value.problems[0].where == "model" and "backend='vllm'" in info.value.problems[0].fix
    missing = tmp_path / "no" / "model"
    with pytest.raises(ValidationError) as info:
        run(Read("logits"), str(missing), "Hello")
    (problem,) = info.value.problems
    assert problem.where == "model" and "no model folder" in problem.what and str(tmp_path) in problem.what


def test_sampling_settings_validate():
    with pytest.raises(ValueError, match="max_tokens"):
        Sampling(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_steps_all_reads_every_generated_step(hf_models):
    model = hf_models("qwen2")
    result = run(Read("layers[0].output", steps="all"), model, PROMPTS[:2], sampling=Sampling(max_tokens=5))
    assert [r.shape for r in result["layers[0].output"]] == [(5, model.hidden_size)] * 2
    assert Graph([Read("logits")]) == Read("logits") >> Graph([])


def _assert_same(a, b):
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_save_and_replay_reproduce_a_greedy_run_exactly(backend, hf_models, vllm_models, tmp_path):
    from nnterp.dsl import RunResult, replay

    model = hf_models("llama") if backend == "hf" else vllm_models("llama")
    graph = (Steer(1, _vector(model)) >> Lens(top_k=3) >> Read("layers[0].output", positions=None)
             >> Read("logits", steps="all"))
    result = run(graph, model, PROMPTS[:2], sampling=Sampling(max_tokens=3))
    result.save(tmp_path)
    loaded = RunResult.load(tmp_path)
    again = replay(tmp_path, model=model)
    for name in result.keys():
        _assert_same(loaded[name], result[name])
        _assert_same(again[name], result[name])
    assert again.tokens == loaded.tokens == result.tokens and loaded.texts == result.texts
    assert loaded.manifest["model"] == result.manifest["model"]
    assert result.manifest["model"]["weights_digest"] is not None


def test_replay_warns_when_the_model_differs(hf_models):
    from nnterp.dsl import replay

    model = hf_models("llama")
    result = run(Read("logits"), model, PROMPTS[0])
    manifest = dict(result.manifest, model=dict(result.manifest["model"], config_digest="0" * 64))
    with pytest.warns(UserWarning, match="different configuration"):
        replay(manifest, model=model)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_generation_that_ends_early_has_the_same_steps_on_both_backends(hf_models, vllm_models):
    chat = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"  # answers, then <|im_end|>
    graph = Read("layers[3].output", steps="all") >> Steer(3, torch.zeros(576))
    results = [run(graph, model, [chat, PROMPTS[0]], sampling=Sampling(max_tokens=40))
               for model in (hf_models("bundled"), vllm_models("bundled"))]
    hf, vllm = results
    assert hf.tokens == vllm.tokens
    assert len(hf.tokens[0]) < 40 and hf.tokens[0][-1] == 2  # ended on <|im_end|>
    for result in results:
        assert [r.shape[0] for r in result["layers[3].output"]] == [len(t) for t in result.tokens]
    assert_close_per_token(vllm["layers[3].output"][0], hf["layers[3].output"][0], "early end")
