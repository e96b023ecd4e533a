"""The function API (interventions, activations, prompts) on both backends.

Tolerances follow from float32 (eps = 2**-23): see each comparison for its reason.
"""

from __future__ import annotations

import pytest
import torch

from nnterp.activations import collect_token_activations_batched, get_token_activations
from nnterp.interventions import IDENTITY_PROMPT, identity_prompt, logit_lens, patchscope_generate, \
    patchscope_lens, steer
from nnterp.prompts import Prompt, first_token_ids, target_probabilities
from test_vllm_backend import assert_close_per_token

PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at"]
BACKENDS = ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])]
EPS = torch.finfo(torch.float32).eps
#: Two computations of one next-token distribution that differ only in the order of their
#: float32 sums (another batch or matmul shape): a logit moves by δ ≤ 2**7 eps of |logit|
#: ≤ 32 (SmolLM2 peaks at 28 here), so δ ≤ 5e-4, and a probability p by at most 2δp.
#: Measured: 3.5e-5 of p (HF), 2.6e-5 (vLLM).
SAME_DISTRIBUTION = dict(atol=0, rtol=2 * 2**7 * EPS * 32)


def _model(backend, hf_models, vllm_models, family="bundled"):
    return hf_models(family) if backend == "hf" else vllm_models(family)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_lens_shapes_and_last_layer_is_the_next_token_distribution(backend, hf_models, vllm_models):
    model = _model(backend, hf_models, vllm_models)
    probs = logit_lens(model, PROMPTS)
    assert probs.shape == (3, model.num_layers, model.vocab_size)
    # a softmax over V float32 terms, then a sum of V: within (V + 1)·eps of 1 in any order
    # the kernels add in (see test_bundled_model_predicts_paris; measured 1.3e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, model.num_layers), atol=(model.vocab_size + 1) * EPS,
                               rtol=0)
    with model.trace(PROMPTS[0]):
        next_probs = model.next_token_probs.save()
    torch.testing.assert_close(probs[0, -1], next_probs[0].float(), **SAME_DISTRIBUTION)
    values, ids = logit_lens(model, PROMPTS, layers=[0, 29], top_k=3)
    assert values.shape == ids.shape == (3, 2, 3)
    assert model.tokenizer.decode(ids[0, 1, 0]) == " Paris"


@pytest.mark.parametrize("backend", BACKENDS)
def test_activations_shapes_and_batched_equals_unbatched(backend, hf_models, vllm_models):
    model = _model(backend, hf_models, vllm_models)
    prompts = PROMPTS + ["Hi there", "A much longer prompt that pads the others in a batch"]
    full = get_token_activations(model, prompts)
    assert full.shape == (model.num_layers, 5, model.hidden_size) and full.device.type == "cpu"
    batched = collect_token_activations_batched(model, prompts, batch_size=2, progress=False)
    # the same values up to float32 rounding: HF pads each batch to its own longest
    # prompt, and that changes the shapes of the matmuls (not what they compute). The
    # noise is relative to each token's scale: measured 5.5 eps on HF (vLLM: exact, one
    # request per prompt either way); 2**7 eps leaves a margin, as in the HF backend tests
    assert_close_per_token(batched, full, "batched vs unbatched", atol=0, token_rtol=2**7 * EPS)
    two = get_token_activations(model, prompts, layers=[1, 3], positions=[0, -1], site="mlps_output")
    assert two.shape == (2, 5, 2, model.hidden_size)
    with pytest.raises(ValueError, match="site must be one of"):
        get_token_activations(model, prompts, site="heads")


def test_activations_match_the_accessors(hf_models):
    model = hf_models("llama")
    acts = get_token_activations(model, PROMPTS[0], layers=[2], site="attentions_output")
    with torch.no_grad(), model.trace(PROMPTS[0]):
        want = model.attentions_output[2][:, -1].save()
    torch.testing.assert_close(acts[0], want, atol=0, rtol=0)  # the same trace on the same prompt: exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_patchscope_with_the_same_prompt_at_layer_0_reproduces_its_prediction(backend, hf_models, vllm_models):
    model = _model(backend, hf_models, vllm_models)
    probs = patchscope_lens(model, PROMPTS[0], target_prompt=PROMPTS[0], layers=[0])
    own = logit_lens(model, PROMPTS[0], layers=[-1])
    assert probs.shape == (1, 1, model.vocab_size)
    # patching a prompt's own layer-0 value into itself changes nothing; the patched run
    # may still batch differently (HF: exact; vLLM: 6.6e-7)
    torch.testing.assert_close(probs[0, 0], own[0, 0], **SAME_DISTRIBUTION)


def test_patchscope_decodes_a_latent_through_the_identity_prompt(hf_models):
    model = hf_models("bundled")
    assert identity_prompt() == IDENTITY_PROMPT
    values, ids = patchscope_lens(model, ["Paris", "London"], layers=[2, 4], top_k=3)
    assert values.shape == (2, 2, 3)
    texts = patchscope_generate(model, ["Paris"], layers=[3], max_tokens=4)
    assert set(texts) == {3} and len(texts[3]) == 1 and isinstance(texts[3][0], str)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steering_with_zero_changes_nothing_and_a_real_vector_changes_the_text(backend, hf_models, vllm_models):
    model = _model(backend, hf_models, vllm_models)
    from nnterp.dsl import Read, Sampling, run

    clean = steer(model, PROMPTS[:2], 10, torch.zeros(model.hidden_size), max_tokens=6)
    unsteered = run(Read("logits"), model, PROMPTS[:2], sampling=Sampling(max_tokens=6))
    assert clean.tokens == unsteered.tokens
    token = model.tokenizer(" London", add_special_tokens=False)["input_ids"][0]
    from nnterp.demo import _unembedding_row

    direction = _unembedding_row(token)
    steered = steer(model, PROMPTS[:2], 25, direction / direction.norm(), scale=80.0, max_tokens=6)
    assert steered.texts != clean.texts
    assert " London" in steered.texts[0]


def test_target_probabilities_table(hf_models):
    model = hf_models("bundled")
    assert len(first_token_ids(model.tokenizer, "Paris")) == 2  # " Paris" and "Paris" differ
    prompts = [Prompt("The capital of France is", {"answer": ["Paris"], "other": ["London", "Rome"]})]
    rows = target_probabilities(model, prompts)
    assert len(rows) == 2 * model.num_layers
    answer = [r for r in rows if r["target"] == "answer"]
    assert [r["layer"] for r in answer] == list(range(model.num_layers))
    assert answer[-1]["probability"] > 0.5 > answer[0]["probability"]
    other = [r for r in rows if r["target"] == "other"]
    assert other[-1]["probability"] < answer[-1]["probability"]
    with pytest.raises(ValueError, match="non-empty words"):
        Prompt("x", {"a": []})
