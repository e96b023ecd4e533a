"""Many graphs in one call: ``run([g1, g2, ...])`` and ``run_batch(jobs)``.

Every job's result must equal what its graph gives alone, on both backends. On vLLM the
requests of every plan share the engine's batches, so a step's tables mix the tokens of
many plans: each plan's edits must reach its own tokens and no other's, and each plan's
reads must come back to it alone.
"""

from __future__ import annotations

import pytest
import torch

from nnterp.dsl import (Graph, Job, Lens, ModelSpec, Patch, Read, Sampling, Steer, ValidationError, Zero, run,
                        run_batch)
from test_dsl_run import PROMPTS, _compare

GREEDY = Sampling(max_tokens=4)


def _vectors(model, n, scale=0.5):
    generator = torch.Generator().manual_seed(7)
    return [scale * torch.randn(model.hidden_size, generator=generator) for _ in range(n)]


def _assert_same(batched, alone, what):
    assert batched.tokens == alone.tokens, f"{what}: tokens"
    assert batched.keys() == alone.keys(), what
    for name in alone.keys():
        _compare(batched[name], alone[name], f"{what} {name!r}")


def _mixed_jobs(model):
    """Jobs that exercise every kind of table at once: constant steers, steers at some
    positions and steps, zeros, patches, reads of every shape, lenses and logits."""
    v = _vectors(model, 4)
    last = model.num_layers - 1
    return [
        (Steer(1, v[0], scale=4.0) >> Read(f"layers[{last}].output", positions=[-1]), PROMPTS, GREEDY),
        (Lens(top_k=5) >> Read("logits"), PROMPTS[:2]),
        (Zero("mlps[1].output", positions=[-1]) >> Read("layers[2].output", positions=None), PROMPTS[1:]),
        (Patch("layers[0].output", value=v[1], positions=[0]) >> Lens(layers=[0, -1], positions=[-2, -1]), PROMPTS),
        (Steer(0, v[2], scale=2.0, positions=[-1]) >> Read("layers[1].output", positions=[-1], steps="all")
         >> Lens(positions=[-1], steps=[1, 2], top_k=3, name="late"), PROMPTS, GREEDY),
        # one job per prompt, each its own steering vector
        *[(Steer(2, v[3] * (i + 1), scale=3.0) >> Read("logits"), [prompt], GREEDY)
          for i, prompt in enumerate(PROMPTS)],
        # the same graph twice, on different prompts: they run as one plan
        (Read("attentions[1].output", positions=[0, -1]), PROMPTS[:1]),
        (Read("attentions[1].output", positions=[0, -1]), PROMPTS[1:]),
        # no intervention at all
        (Read("embeddings.output", positions=[-1]), PROMPTS, GREEDY),
    ]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_a_batch_of_mixed_jobs_equals_each_job_alone(backend, hf_models, vllm_models):
    model = hf_models("llama") if backend == "hf" else vllm_models("llama")
    jobs = _mixed_jobs(model)
    results = run_batch(jobs, model)
    assert len(results) == len(jobs)
    for index, (job, result) in enumerate(zip(jobs, results)):
        alone = run(job[0], model, job[1], sampling=job[2] if len(job) == 3 else None)
        _assert_same(result, alone, f"jobs[{index}]")
        assert result.manifest["batch"] == {"job": index, "jobs": len(jobs)}
        assert result.manifest["prompts"] == list(job[1])


@pytest.mark.vllm
@pytest.mark.slow
def test_a_sweep_of_240_steering_graphs_in_one_call_equals_240_calls(vllm_models):
    """The issue's sweep, on the CPU: 3 layers x 8 scales x 10 vectors, every graph on
    every prompt, against 240 separate calls."""
    model = vllm_models("llama")
    scales = [0.5, 1, 2, 3, 4, 6, 8, 12]
    graphs = [Steer(layer, vector, scale=scale) >> Read("layers[2].output", positions=[-1])
              for vector in _vectors(model, 10) for layer in range(3) for scale in scales]
    assert len(graphs) == 240 and len({g.digest() for g in graphs}) == 240
    prompts = PROMPTS[:2]
    swept = run(graphs, model, prompts, sampling=GREEDY)
    assert len(swept) == 240
    for index, (graph, result) in enumerate(zip(graphs, swept)):
        _assert_same(result, run(graph, model, prompts, sampling=GREEDY), f"graphs[{index}]")
    # the sweep did steer: the scales move the tokens or the read apart
    assert len({tuple(map(tuple, r.tokens)) + (round(float(r["layers[2].output"].sum()), 3),) for r in swept}) > 200


@pytest.mark.vllm
@pytest.mark.slow
def test_a_batch_that_needs_more_vectors_than_the_engine_holds_runs_in_waves(vllm_models):
    model = vllm_models("llama", vector_rows=8)  # 7 rows for edits: 12 steers need two waves
    assert ModelSpec.from_model(model).vector_rows == 8
    graphs = [Steer(i % 3, vector, scale=2.0) >> Read("logits") for i, vector in enumerate(_vectors(model, 12))]
    # each of these uses up to 3 rows (none, zero) x (steer or not), though it needs 1 at least
    graphs += [Zero("layers[1].output", positions=[0]) >> Steer(1, vector) >> Read("logits")
               for vector in _vectors(model, 6, scale=1.0)]
    swept = run(graphs, model, PROMPTS, sampling=GREEDY)
    for index, (graph, result) in enumerate(zip(graphs, swept)):
        _assert_same(result, run(graph, model, PROMPTS, sampling=GREEDY), f"graphs[{index}]")


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_seeded_sampling_in_a_batch_samples_what_each_job_samples_alone(backend, hf_models, vllm_models):
    model = hf_models("llama") if backend == "hf" else vllm_models("llama")
    sampling = Sampling(max_tokens=5, temperature=1.0, seed=3)
    v = _vectors(model, 1)[0]
    jobs = [(Steer(1, v), PROMPTS, sampling), (Steer(1, v), PROMPTS[:1], sampling), (Read("logits"), PROMPTS, sampling)]
    results = run_batch(jobs, model)
    for index, ((graph, prompts, _), result) in enumerate(zip(jobs, results)):
        assert result.tokens == run(graph, model, prompts, sampling=sampling).tokens, f"jobs[{index}]"


def test_validation_reports_every_problem_of_every_job_naming_the_job(hf_models):
    model = hf_models("llama")
    good = Read("layers[0].output")
    jobs = [(good, PROMPTS),
            (Read("layers[7].output"), PROMPTS),
            Job(Steer(0, [0.0] * 3) >> Read("layers[0].output", positions=[40]), PROMPTS)]
    with pytest.raises(ValidationError) as caught:
        run_batch(jobs, model)
    where = [p.where for p in caught.value.problems]
    assert where[0].startswith("jobs[1] nodes[0] Read")
    assert any(w.startswith("jobs[2] nodes[0] Steer.vector") for w in where)
    assert any(w.startswith("jobs[2] nodes[1] Read") for w in where)  # a position the prompts lack
    assert "in jobs[1], jobs[2] (of 3 jobs)" in str(caught.value)
    # run with a list of graphs names them graphs[i]
    with pytest.raises(ValidationError, match=r"graphs\[1\] nodes\[0\] Read"):
        run([good, Read("layers[7].output")], model, PROMPTS)


def test_bad_jobs_are_refused_with_where_they_are(hf_models):
    model = hf_models("llama")
    with pytest.raises(TypeError, match=r"jobs\[1\] must be \(graph, prompts\)"):
        run_batch([(Read("logits"), PROMPTS), Read("logits")], model)
    with pytest.raises(TypeError, match=r"jobs\[0\]: prompts must be non-empty strings; prompts\[1\]"):
        run_batch([(Read("logits"), ["a", ""])], model)
    with pytest.raises(TypeError, match=r"jobs\[0\]: the graph must be a Graph or a node"):
        run_batch([("layers[0].output", PROMPTS)], model)
    with pytest.raises(ValueError, match="at least one job"):
        run_batch([], model)
    with pytest.raises(ValueError, match="list of graphs is empty"):
        run([], model, PROMPTS)
    with pytest.raises(TypeError, match=r"graphs\[1\] must be a Graph or a node"):
        run([Read("logits"), "logits"], model, PROMPTS)
    with pytest.raises(TypeError, match="a list of jobs"):
        run_batch(Graph([Read("logits")]), model)


def test_hf_runs_a_call_in_padded_batches_of_a_token_budget_with_the_same_results(hf_models):
    whole, small = hf_models("llama"), hf_models("llama", batch_tokens=24)  # 2-3 prompts a batch at most
    prompts = [p for p in PROMPTS for _ in range(3)]
    graph = (Steer(1, _vectors(whole, 1)[0], scale=3.0) >> Read("layers[2].output", positions=None)
             >> Lens(positions=[-1], top_k=4) >> Read("logits", positions=[-1], steps="all"))
    _assert_same(run(graph, small, prompts, sampling=GREEDY), run(graph, whole, prompts, sampling=GREEDY), "batched")
    # a seeded sample is reproducible, and copies of a prompt in different batches differ
    seeded = Sampling(max_tokens=6, temperature=1.0, seed=1)
    copies = run(Read("logits"), small, [PROMPTS[0]] * 6, sampling=seeded).tokens
    assert copies == run(Read("logits"), small, [PROMPTS[0]] * 6, sampling=seeded).tokens
    assert len({tuple(t) for t in copies}) > 1
    with pytest.raises(ValueError, match="batch_tokens must be a positive int"):
        hf_models("llama", batch_tokens=0)
