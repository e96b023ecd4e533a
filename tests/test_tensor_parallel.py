"""Tensor parallelism keeps nnterp's meaning: the same graphs at TP=1 and TP=2 agree.

Runs wherever two ranks fit: on two GPUs, or on two CPU cores (vLLM's CPU backend runs
tensor parallelism too; nnterp gives each rank its own cores). Skipped otherwise.

Under TP=2 vLLM splits every linear layer and the unembedding across ranks. nnsight
gathers split activations before a graph sees them; the unembedding behind `Lens` is
gathered by nnterp (`nnterp.backends.internals.unembed`). The two engines reduce in
different orders, so values agree to rounding: float32 on CPU to 2**7 eps of each
token's scale; bfloat16 on GPUs within the tolerance measured on two H100s (see TOLERANCES).
"""

from __future__ import annotations

import os

import pytest
import torch

from nnterp import BackendUnsupportedError, StandardizedTransformer
from nnterp.dsl import Lens, Patch, Read, Sampling, Source, Steer, Zero, run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from backend_settings import TEST_DTYPE, engine_kwargs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANKS_AVAILABLE = torch.cuda.device_count() if DEVICE == "cuda" else len(os.sched_getaffinity(0))
if RANKS_AVAILABLE < 2:
    pytest.skip(f"tensor parallelism needs 2 GPUs or 2 CPU cores; this machine has {RANKS_AVAILABLE} "
                f"{'GPU' if DEVICE == 'cuda' else 'core'}", allow_module_level=True)

FAMILIES = ["llama", "qwen2", "gpt2"]
PROMPTS = ["The capital of France is", "One, two, three, four"]
EPS = torch.finfo(torch.float32).eps
#: (device, dtype) -> (absolute tolerance, tolerance relative to the token's largest value)
#: between TP=1 and TP=2. TP=2 splits each row-parallel matmul's sum in two and adds the
#: halves, so values differ by rounding noise that scales with the token's magnitude.
#: bfloat16 on two H100s: 0.031 at a token of scale 27 (a steered residual stream), i.e.
#: one bfloat16 rounding step of that token's larger features.
TOLERANCES = {
    # measured on CPU: at most 8.3 eps of the token's scale (an MLP output of scale 0.03),
    # 0.6 eps on a steered stream of scale 27, 2.4 eps on the lens; 2**7 eps leaves a
    # margin, and 1e-6 (8 eps at unit scale) keeps a token near 0 from needing exactness
    ("cpu", "float32"): (1e-6, 2**7 * EPS),
    # the same as on CPU: float32 GPU engines compute in IEEE float32 (see
    # nnterp.backends.vllm_settings.FLOAT32_ENVIRONMENT), and the ranks' all-reduce adds
    # two float32 halves (on two H200s every test here passed, in float32 and bfloat16)
    ("cuda", "float32"): (1e-6, 2**7 * EPS),
    ("cuda", "bfloat16"): (0.02, 0.01),
}
ATOL, TOKEN_RTOL = TOLERANCES.get((DEVICE, TEST_DTYPE), (0.1, 0.02))  # else: ~3 bfloat16 steps (2**-7)
SITES = ["layers[{i}].input", "attentions[{i}].output", "mlps[{i}].output", "layers[{i}].output"]


@pytest.fixture(scope="module")
def engines(vllm_models, tiny_dir):
    """``engines(family)`` -> (TP=1 model, TP=2 model); the TP=2 engines close with the module."""
    cache = {}

    def load(family: str):
        if family not in cache:
            cache[family] = StandardizedTransformer(tiny_dir(family), backend="vllm", tensor_parallel_size=2,
                                                    **engine_kwargs())
        return vllm_models(family), cache[family]

    yield load
    for model in cache.values():
        model.close()


def _close(got, want, what):
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()
    bound = ATOL + TOKEN_RTOL * want.abs().amax(dim=-1, keepdim=True)
    assert (diff <= bound).all(), (f"{what}: TP=2 differs from TP=1 by {diff.max().item():.3g} "
                                   f"(tolerance {ATOL} + {TOKEN_RTOL} x the token's largest value)")


def _both(engines, family, graph, **kwargs):
    one, two = engines(family)
    return run(graph, one, PROMPTS, **kwargs), run(graph, two, PROMPTS, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_and_the_logits_agree(engines, family):
    one, _ = engines(family)
    nodes = [Read("embeddings.output", positions=None), Read("logits")]
    for i in range(one.num_layers):
        nodes += [Read(site.format(i=i), positions=None) for site in SITES]
    graph = nodes[0]
    for node in nodes[1:]:
        graph = graph >> node
    a, b = _both(engines, family, graph)
    assert list(a.keys()) == list(b.keys())
    for name in a.keys():
        values_a, values_b = a[name], b[name]
        if isinstance(values_a, list):
            # zip stops at the shorter: a prompt missing at TP=2 must fail here
            assert len(values_b) == len(values_a), f"{family} {name}: {len(values_b)} prompts vs {len(values_a)}"
            for p, (x, y) in enumerate(zip(values_a, values_b)):
                _close(y, x, f"{family} {name} prompt {p}")
        else:
            _close(values_b, values_a, f"{family} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_is_gathered_over_the_whole_vocabulary(engines, family):
    # a lens on the local shard alone would be a softmax over half the vocabulary
    a, b = _both(engines, family, Lens() >> Lens(top_k=5, name="top"))
    vocab = engines(family)[0].config.vocab_size
    assert a["lens"].shape[-1] == b["lens"].shape[-1] == vocab
    _close(b["lens"], a["lens"], f"{family} lens")
    # a float32 softmax over V terms, then a sum of V: within (V + 1)·eps of 1 in any order
    # (see test_hf_backend's test_bundled_model_predicts_paris; measured 2 eps)
    torch.testing.assert_close(b["lens"].sum(-1), torch.ones(b["lens"].shape[:-1]), atol=(vocab + 1) * EPS, rtol=0)
    _close(b["top"][0], a["top"][0], f"{family} top-5 probabilities")


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_generation_agrees_token_for_token(engines, family):
    one, _ = engines(family)
    torch.manual_seed(0)
    vector = torch.randn(one.config.hidden_size)
    graph = Steer(1, vector, scale=8.0) >> Read("layers[-1].output", steps="all") >> Read("logits", steps="all")
    a, b = _both(engines, family, graph, sampling=Sampling(max_tokens=8))
    assert a.tokens == b.tokens
    assert all(len(t) == 8 for t in a.tokens)
    for p in range(len(PROMPTS)):
        _close(b["logits"][p], a["logits"][p], f"{family} steered logits, prompt {p}")
        _close(b["layers[-1].output"][p], a["layers[-1].output"][p], f"{family} steered stream, prompt {p}")


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_and_zero_agree(engines, family):
    graph = (Patch("layers[0].output", source=Source("Hello world")) >> Zero("mlps[1].output")
             >> Read("logits"))
    a, b = _both(engines, family, graph)
    _close(b["logits"], a["logits"], f"{family} patched logits")
    plain_a = run(Read("logits"), engines(family)[0], PROMPTS)
    assert (plain_a["logits"] - a["logits"]).abs().max() > 10 * ATOL  # the edits acted


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_put_together_from_the_ranks(engines, family, hf_models):
    """``model.weight`` at TP=2 is HF's tensor, bit for bit: each rank's shard of the
    merged q/k/v (the tiny models' one k/v head is shared by both ranks, and counted once)
    and of gate/up, the row-parallel halves of o and down along their input, the
    vocabulary's halves, and what every rank holds whole (norms, row-parallel biases)."""
    _, two = engines(family)
    hf = hf_models(family)
    names = two.weight_names()
    assert names == hf.weight_names()
    wrong = []
    for name in names:
        got = two.weight(name)
        if not torch.equal(got, hf.weight(name).to(got.dtype)):
            wrong.append(name)
    assert not wrong, f"{family}: {len(wrong)} of {len(names)} weights differ from HF's at TP=2, e.g. {wrong[:5]}"


def test_raw_accessors_write_and_read_across_ranks(engines):
    one, two = engines("llama")
    results = []
    for model in (one, two):
        with model.trace(PROMPTS[0]):
            model.layers_output[1] = model.layers_output[1] * 0.5
            logits = model.logits.save()
        results.append(logits)
    _close(results[1], results[0], "logits after a raw write")


def test_pipeline_parallelism_is_refused_before_anything_loads(tiny_dir):
    with pytest.raises(BackendUnsupportedError, match="pipeline parallelism is not supported.*tensor_parallel_size"):
        StandardizedTransformer(tiny_dir("llama"), backend="vllm", pipeline_parallel_size=2)
