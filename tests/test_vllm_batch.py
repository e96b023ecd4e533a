"""The batch-wide vLLM executor: host tables without an engine, then real engines on CPU.

The host side (`nnterp.backends.batch_program`) is plain arithmetic, tested here against
hand-computed tables: edits compose in graph order, a read sees exactly the edits that
precede it, a recomputed token is edited again but never recorded twice, and a prompt
split into chunks gives the same tables as in one piece. The engine tests run the
executor where vLLM's scheduler does what the tables must survive: chunked prefill,
preemption with recompute (forced with a tiny KV cache), ragged prompts and early
ends, against the nnsight executor and HF. A last test fails loudly if vLLM renames an
internal the executor reads.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from nnterp.backends.batch_program import PlanProgram, TokenBatch, VectorTable, position_matches
from nnterp.dsl import Graph, Lens, ModelSpec, Patch, Read, Sampling, Steer, Zero, run
from nnterp.dsl.lowering import lower
from nnterp.dsl.plan import OutputKey
from nnterp.sites import SiteKind

from backend_settings import executor

SPEC = ModelSpec(num_layers=2, hidden_size=4, num_heads=1, vocab_size=10)
SITES = {(kind, layer): i for i, (kind, layer) in enumerate(
    [(SiteKind.LAYERS_OUTPUT, 0), (SiteKind.LAYERS_OUTPUT, 1), (SiteKind.MLPS_OUTPUT, 0)])}


def _program(graph: Graph, max_tokens: int = 1):
    written = {}
    vectors = VectorTable(64, lambda row, vector: written.__setitem__(row, vector))
    return PlanProgram(lower(graph, SPEC, max_tokens=max_tokens), SITES, vectors), written


def _tokens(prompt, position, length):
    return TokenBatch(np.array(prompt), np.array(position), np.array(length))


# -- host tables -------------------------------------------------------------------------


def test_the_vector_table_takes_back_a_removed_plans_rows():
    written = {}
    table = VectorTable(4, lambda row, vector: written.__setitem__(row, vector))  # rows 1 .. 3
    rows = [table.row((tag, 0), lambda tag=tag: torch.full((2,), float(tag))) for tag in (1, 2, 3)]
    assert rows == [1, 2, 3]
    with pytest.raises(OverflowError, match="installed together"):
        table.row((4, 0), lambda: torch.zeros(2))
    table.release(2)  # plan 2 is collected while 1 and 3 stay
    assert table.row((4, 0), lambda: torch.full((2,), 4.0)) == 2 and written[2][0] == 4.0
    assert table.row((1, 0), lambda: None) == 1  # kept rows are not written again


def test_steps_and_positions_follow_from_position_and_prompt_length():
    tokens = _tokens([0, 0, 0, 1, 1], [0, 3, 4, 1, 6], [4, 4, 4, 2, 2])
    assert tokens.step.tolist() == [0, 0, 1, 0, 5]
    masks = dict(position_matches((0, -1), tokens))
    assert masks[0].tolist() == [True, False, False, False, False]
    assert masks[1].tolist() == [False, True, False, True, False]  # prompt positions only
    # -1 alone is a prompt's last token, and at a generation step the one new token
    ((_, last),) = position_matches(-1, tokens)
    assert last.tolist() == [False, True, True, True, True]
    ((order, every),) = position_matches(None, tokens)
    assert order == -1 and every.all()


def test_edits_compose_in_graph_order_and_reads_see_only_earlier_edits():
    v, w = [1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]
    graph = (Read("layers[0].output", name="clean") >> Steer(0, v, scale=2.0)
             >> Read("layers[0].output", name="steered", positions=None)
             >> Patch("layers[0].output", value=w, positions=[1]) >> Steer(0, v))
    program, written = _program(graph)
    tokens = _tokens([0, 0, 0], [0, 1, 2], [3, 3, 3])
    scale, rows, capture = program.site_step(0, tokens, np.ones(3, dtype=bool))
    # position 1 is patched (then steered by v once); the others are steered by 2v + v
    assert scale.tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(written[rows[0]], torch.tensor([3.0, 6.0, 9.0, 12.0]))
    assert torch.equal(written[rows[1]], torch.tensor([11.0, 2.0, 3.0, 4.0]))
    assert rows[0] == rows[2]
    assert capture.tokens.tolist() == [0, 1, 2]
    reads = {(int(r[0]), int(r[4])): (r[6], int(r[7])) for r in capture.reads}
    clean, steered = 0, 2  # op indices in the plan (graph order at one site)
    assert reads[(clean, 2)] == (1.0, 0)  # the clean read: no edit before it
    a, row = reads[(steered, 1)]
    assert a == 1.0 and torch.equal(written[row], torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert program.site_step(1, tokens, np.ones(3, dtype=bool)) is None  # nothing at layer 1


def test_a_recomputed_token_is_edited_again_but_not_recorded_again():
    program, _ = _program(Steer(0, [1.0] * 4) >> Read("layers[0].output", positions=None, steps="all"),
                          max_tokens=4)
    tokens = _tokens([0, 0, 0, 0], [0, 1, 2, 3], [2, 2, 2, 2])
    first = program.site_step(0, tokens, np.ones(4, dtype=bool))
    again = program.site_step(0, tokens, np.array([False, False, False, True]))  # recorded up to 3
    assert first[1].tolist() == again[1].tolist() and (again[1] > 0).all()
    assert again[2].tokens.tolist() == [3]


def test_a_prompt_in_chunks_gives_the_tables_of_the_whole_prompt():
    graph = Zero("mlps[0].output", positions=[1, -1]) >> Lens(positions=None) >> Steer(1, [1.0] * 4, positions=[0])
    program, _ = _program(graph)
    whole = _tokens([0] * 5, list(range(5)), [5] * 5)
    parts = [_tokens([0] * 2, [0, 1], [5] * 2), _tokens([0] * 3, [2, 3, 4], [5] * 3)]
    for site in (0, 1, 2):
        full = program.site_step(site, whole, np.ones(5, dtype=bool))
        pieces = [program.site_step(site, part, np.ones(len(part.position), dtype=bool)) for part in parts]
        assert np.concatenate([p[0] for p in pieces]).tolist() == full[0].tolist()
        assert np.concatenate([p[1] for p in pieces]).tolist() == full[1].tolist()


def test_other_requests_are_left_alone():
    program, _ = _program(Steer(0, [1.0] * 4) >> Read("layers[0].output"))
    tokens = _tokens([-1, 0, -1], [4, 2, 0], [5, 3, 1])
    scale, rows, capture = program.site_step(0, tokens, np.ones(3, dtype=bool))
    assert rows[0] == 0 and rows[2] == 0 and rows[1] > 0
    assert capture.tokens.tolist() == [1]


def test_a_step_works_out_sites_that_read_alike_once_and_gives_each_its_own_ops():
    # every layer read at two positions (a sweep), plus a site that also steers: the
    # grouped step must equal each site's own tables, op indices included
    graph = (Read("layers[0].output", positions=[0, -1]) >> Read("layers[1].output", positions=[0, -1])
             >> Read("mlps[0].output", positions=[0, -1]) >> Steer(1, [1.0] * 4, positions=[1])
             >> Read("layers[1].output", positions=None, name="after"))
    program, _ = _program(graph)
    tokens = _tokens([0, 0, 0, 1, 1, -1], [0, 1, 2, 0, 1, 3], [3, 3, 3, 2, 2, 4])
    fresh = np.array([True, True, True, True, False, True])
    grouped = dict(program.step(tokens, fresh))
    assert set(grouped) == {0, 1, 2}
    for site in (0, 1, 2):
        alone = program.site_step(site, tokens, fresh)
        assert grouped[site][0].tolist() == alone[0].tolist() and grouped[site][1].tolist() == alone[1].tolist()
        assert grouped[site][2].tokens.tolist() == alone[2].tokens.tolist()
        assert grouped[site][2].reads.tolist() == alone[2].reads.tolist()
    # the read-only sites 0 and 2 share tokens but record their own ops
    ops_of = {site: {index for index, _ in program.site_ops[site]} for site in (0, 2)}
    assert ops_of[0] != ops_of[2]
    assert {int(r[0]) for r in grouped[0][2].reads} == ops_of[0]
    assert {int(r[0]) for r in grouped[2][2].reads} == ops_of[2]


@pytest.mark.parametrize("large", [False, True])
def test_results_leave_the_worker_sorted_whole_and_through_shared_memory_when_large(large, monkeypatch):
    # Rows arrive step by step, not in prompt order (a long prompt finishes after short
    # ones); the client must get them sorted, as blocks, whether they were pickled or
    # mapped from a file (which must not outlive the reply).
    import glob
    import pickle

    from nnterp.backends import vllm_transport

    monkeypatch.setattr(vllm_transport, "_INLINE_BYTES", 0 if large else 1 << 30)
    plan = lower(Read("layers[0].output") >> Lens(layers=[1], top_k=2), SPEC)
    read, lens = (i for i, op in enumerate(plan.ops))
    rows = lambda *ps: np.array([[p, 0, 0] for p in ps])  # noqa: E731
    data = lambda *ps: torch.tensor([[float(p)] * 4 for p in ps], dtype=torch.bfloat16)  # noqa: E731
    values = {read: [(data(2, 0), rows(2, 0)), (data(1,), rows(1))],
              lens: [((torch.tensor([[0.5, 0.25]]), torch.tensor([[7, 3]])), rows(0))]}
    before = set(glob.glob("/dev/shm/nnterp-*"))
    reply = vllm_transport.ship(values, {"steps": 2})
    assert ("file" in pickle.loads(reply) and pickle.loads(reply)["file"] is not None) == large
    recorded, stats = vllm_transport.read_blocks(plan, reply)
    assert set(glob.glob("/dev/shm/nnterp-*")) == before
    assert stats == {"steps": 2}
    stack = recorded.stacked(plan.ops[read].name, None, 0, 3)
    assert stack.dtype == torch.bfloat16 and stack[:, 0].tolist() == [0.0, 1.0, 2.0]
    probs, ids = recorded[OutputKey(plan.ops[lens].name, step=0, prompt=0, layer=1)]
    assert probs.tolist() == [0.5, 0.25] and ids.tolist() == [7, 3]


# -- engines -----------------------------------------------------------------------------

vllm_only = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ["The capital of France is", "One, two, three, four, five, six, seven, eight, nine,",
           "Hi there", "A long time ago in a galaxy far, far away, there lived a"]


def _graph(model):
    v = 0.5 * torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3))
    return (Read("layers[0].output", positions=None, name="prompt") >> Steer(1, v, scale=2.0)
            >> Patch("mlps[0].output", value=torch.zeros(model.hidden_size), positions=[1])
            >> Read("layers[1].output", steps="all", name="steered") >> Lens(layers=[0, -1], top_k=3, steps="all")
            >> Read("logits", steps="all"))


def _same_outputs(got, want, atol):
    """Every output of run ``want`` in run ``got``, within ``atol``."""
    for name in want.keys():
        _close(got[name], want[name], name, atol)


def _close(got, want, what, atol):
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{what}[{i}]", atol)
        return
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if got.dtype.is_floating_point:
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=what)
    else:
        assert torch.equal(got, want), what


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.vllm
@pytest.mark.slow
def test_batched_and_nnsight_executors_and_hf_agree(family, vllm_models, hf_models):
    model, hf = vllm_models(family), hf_models(family)
    sampling = Sampling(max_tokens=6)
    batched = run(_graph(model), model, PROMPTS, sampling=sampling)
    assert batched.manifest["executor"].startswith("vllm/batched")
    reference = run(_graph(model), hf, PROMPTS, sampling=sampling)
    assert batched.tokens == reference.tokens
    # float32 on both sides, different kernels: the parity tolerance of the backend tests
    # (SPEC: 1e-4); probabilities are bounded by it too
    _same_outputs(batched, reference, atol=1e-4)
    if family == "llama":
        with executor(model, "nnsight"):
            nnsight = run(_graph(model), model, PROMPTS, sampling=sampling)
        assert nnsight.manifest["executor"].startswith("vllm/nnsight")
        assert nnsight.tokens == batched.tokens
        _same_outputs(batched, nnsight, atol=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
def test_chunked_prefill_and_preemption_give_the_same_results(vllm_models):
    """A tiny KV cache and a 16-token step budget: vLLM splits the prompts across steps and
    preempts requests, then prefills them again. Results must not change."""
    plain = vllm_models("llama")
    sampling = Sampling(max_tokens=32)
    want = run(_graph(plain), plain, PROMPTS, sampling=sampling)
    tight = vllm_models("llama", enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4,
                        block_size=32, num_gpu_blocks_override=6, max_model_len=128)
    got = run(_graph(tight), tight, PROMPTS, sampling=sampling)
    stats = got.manifest["executor_stats"]
    # the settings must have forced both, or this test would pass without testing them
    assert stats["prompt_chunks"] > 0 and stats["preemptions"] > 0, stats
    assert got.tokens == want.tokens
    _same_outputs(got, want, atol=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
def test_prefix_caching_neither_skips_hooks_nor_shares_edited_prefixes(vllm_models):
    """With prefix caching on, a run could be served a prefix from the cache (no hook
    would see those tokens) or leave its edited prefix for an unedited request."""
    plain = vllm_models("llama")
    # longer than two cache blocks: only whole blocks are cached
    prompts = ["The capital of France is the city of lights, and the capital of Italy is the city of "
               "seven hills; the capital of Spain is a city on a high plain, and the capital of Portugal "
               "is a city by the sea. Which of them is the oldest? The answer is"] * 2
    steer = Steer(0, torch.full((plain.hidden_size,), 0.5)) >> Read("layers[1].output", positions=None)
    clean, steered = (run(g, plain, prompts) for g in (Read("layers[1].output", positions=None), steer))
    cached = vllm_models("llama", enable_prefix_caching=True, block_size=32)
    for graph, want in ((steer, steered), (Read("layers[1].output", positions=None), clean), (steer, steered)):
        got = run(graph, cached, prompts)
        _close(got["layers[1].output"], want["layers[1].output"], "layers[1].output", atol=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
def test_one_engine_serves_nnsight_traces_and_batched_runs(vllm_models):
    model = vllm_models("llama")
    with model.trace("The capital of France is"):
        traced = model.layers_output[1].save()
    engine_class = type(model.nnsight_model.vllm_entrypoint.llm_engine)
    ran = run(Read("layers[1].output", positions=None), model, "The capital of France is")
    traced = traced.cpu()  # a trace's saves stay on the engine's device; run returns host tensors
    assert torch.equal(ran["layers[1].output"][0], traced[0])
    # a batched run steps the engine as vLLM's own, then gives nnsight its engine back
    assert type(model.nnsight_model.vllm_entrypoint.llm_engine) is engine_class
    with model.trace("The capital of France is"):
        again = model.layers_output[1].save()
    assert torch.equal(again.cpu(), traced)


def test_the_vllm_internals_the_executor_reads_are_there():
    """The canary of `nnterp.backends.internals`: what it reads and overrides of vLLM
    and nnsight still exists, and its functions give what the executor expects."""
    pytest.importorskip("vllm")
    from nnsight.modeling.vllm import VLLM
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from nnterp.backends import internals

    for name in (*internals.RUNNER_HOOKS, "get_model"):
        assert callable(getattr(GPUModelRunner, name, None)), f"GPUModelRunner.{name} is gone"
    assert list(inspect.signature(GPUModelRunner._prepare_inputs).parameters)[1:3] == [
        "scheduler_output", "num_scheduled_tokens"]
    assert "discard_request_mask" in inspect.getsource(GPUModelRunner._prepare_inputs)
    batch_source = inspect.getsource(InputBatch)
    for name in ("req_ids", "num_reqs", "num_computed_tokens_cpu"):
        assert f"self.{name}" in batch_source or f"def {name}" in batch_source, f"InputBatch.{name} is gone"
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"num_scheduled_tokens", "scheduled_new_reqs", "finished_req_ids", "preempted_req_ids"} <= fields
    assert {"req_id", "sampling_params", "prompt_token_ids"} <= {f.name for f in dataclasses.fields(NewRequestData)}
    for name in ("_WORKER_CLS", "_load_sync", "_call", "_attach_mediators", "_collect"):
        assert hasattr(VLLM, name), f"nnsight's VLLM.{name} is gone"
    assert issubclass(internals.engine_class(), VLLM)
    # the hook layout rides additional_config, which must stay part of the compile-cache
    # key, or a model compiled without the hooks could be loaded into a hooked engine
    from vllm.config import VllmConfig

    assert "additional_config" in inspect.getsource(VllmConfig.compute_hash)

    # the functions, on vLLM's own types
    assert {"max_tokens", "seed", "extra_args", "detokenize"} <= internals.sampling_params_fields()
    params = SamplingParams(max_tokens=2, extra_args={"nnterp": ("plan", 3)})
    new = NewRequestData(**{f.name: None for f in dataclasses.fields(NewRequestData)
                            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
                         | {"req_id": "r0", "sampling_params": params, "prompt_token_ids": [5, 6, 7]})
    output = SchedulerOutput(**{f.name: None for f in dataclasses.fields(SchedulerOutput)
                                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
                             | {"scheduled_new_reqs": [new]})
    (admitted,) = internals.new_requests(output)
    assert (admitted.request_id, admitted.tag, admitted.prompt_length) == ("r0", ("plan", 3), 3)
    assert tuple(internals.preempted_request_ids(output)) == ()
    finished = RequestOutput(request_id="r0", prompt=None, prompt_token_ids=[5, 6, 7], prompt_logprobs=None,
                             outputs=[CompletionOutput(0, "", [8, 9], None, None),
                                      CompletionOutput(1, "", [8], None, None)], finished=True)
    assert internals.request_token_ids(finished, pad=0).tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]


def test_private_names_of_vllm_and_nnsight_are_spelled_in_the_adapter_only():
    """`nnterp.backends.internals` is the one place that touches vLLM's and nnsight's
    insides: no other module of nnterp spells one of the names it wraps."""
    import re
    from pathlib import Path

    import nnterp

    names = [r"\._module\b", r"__wrapped__", r"_attach_mediators", r"\._collect\(", r"_load_sync", r"(?<![A-Za-z])_WORKER_CLS",
             r"_update_states", r"_prepare_inputs", r"__struct_fields__", r"\.interleaver\b", r"mock\.patch",
             r"preempted_req_ids", r"\blogits_processor\b", r"\.compute_logits\b", r"\.max_num_tokens\b",
             r"\.input_batch\b", r"discard_request_mask", r"scheduled_new_reqs"]
    root = Path(nnterp.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"(#.*|``[^`]*``|`[^`]*`)", "", line)  # comments and quoted names aside
            found += [f"{path.relative_to(root)}:{number}: {line.strip()}" for name in names if re.search(name, code)]
    assert found == []


@pytest.mark.vllm
@pytest.mark.slow
def test_a_step_that_reads_past_the_capture_buffer_fails_its_run_not_the_engine(vllm_models):
    """16 tokens a step and a buffer of 16 + 64 rows: reading every position of 12 sites
    is 16 rows a site a step. The run fails with a clear error; the engine goes on,
    and its next run equals a fresh engine's."""
    from nnterp.errors import CaptureOverflowError

    plain = vllm_models("llama")
    small = vllm_models("llama", capture_bytes=1, enable_chunked_prefill=True, max_num_batched_tokens=16,
                        max_num_seqs=4, max_model_len=128)
    sites = [f"{kind}[{i}].{end}" for i in range(small.num_layers)
             for kind, end in (("layers", "input"), ("layers", "output"), ("attentions", "output"), ("mlps", "output"))]
    every = Graph([Read(site, positions=None) for site in sites])
    assert len(sites) * 16 > 16 + 64
    with pytest.raises(CaptureOverflowError, match="capture buffer"):
        run([every, _graph(small)], small, PROMPTS, sampling=Sampling(max_tokens=2))
    want = run(_graph(plain), plain, PROMPTS, sampling=Sampling(max_tokens=4))
    got = run(_graph(small), small, PROMPTS, sampling=Sampling(max_tokens=4))
    assert got.tokens == want.tokens
    _same_outputs(got, want, atol=1e-5)
