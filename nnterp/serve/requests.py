"""A request's graph, prompts and sampling, checked before the engine sees any of it.

Every check here is a refusal with a status and a list of problems (what, where, fix):
413 for a request past a `ServeLimits` bound, 400 for anything malformed or invalid.
The graph document goes through the DSL's own loader (``Graph.from_json``), which never
imports or executes anything a document names and reports every structural problem;
then through `nnterp.dsl.validate` against the served model's spec, with the request's
prompts and sampling.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from nnterp.dsl import Graph, GraphFormatError, Sampling, ValidationError, validate
from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Patch, Read
from nnterp.dsl.spec import ModelSpec
from nnterp.dsl.values import TensorValue
from nnterp.serve.limits import ServeLimits

__all__ = ["RequestProblem", "read_graph", "read_run_request", "problem_body"]

#: nodes that record values: they belong on ``/nnterp/run``, not on a completion
_READS = (Read, Lens, Grad, AttentionProbs)


class RequestProblem(Exception):
    """A request the server refuses: an HTTP status and every problem found."""

    def __init__(self, status: int, problems: list[dict[str, str]]) -> None:
        self.status, self.problems = status, problems
        super().__init__("; ".join(f"{p['where']}: {p['what']}" for p in problems))


def _problem(where: str, what: str, fix: str) -> dict[str, str]:
    return {"where": where, "what": what, "fix": fix}


def problem_body(error: RequestProblem) -> dict:
    """The JSON body of a refusal, in the OpenAI error form (``{"error": {...}}``) that
    OpenAI clients read, with nnterp's problems beside the message."""
    kind = "request_too_large" if error.status == 413 else "invalid_request_error"
    return {"error": {"message": f"nnterp: {error}", "type": kind, "code": error.status,
                      "problems": error.problems}}


def _tensor_bytes(graph: Graph) -> int:
    total = 0
    for node in graph:
        for field in attrs.fields(type(node)):
            value = getattr(node, field.name)
            if isinstance(value, TensorValue):
                total += len(value.data)
    return total


def read_graph(document: Any, spec: ModelSpec, limits: ServeLimits, *, where: str = "nnterp.graph",
               edits_only: bool = False, prompts: list[str] | None = None, sampling: Sampling | None = None,
               model: Any = None) -> Graph:
    """The graph of a request, checked: well formed, within the limits, valid for the
    served model (and the request's prompts and sampling, when given).

    Args:
        document: the graph document as the request's JSON holds it (an object).
        edits_only: refuse nodes that read (a completion's graph steers, zeroes or
            patches; reads go to ``/nnterp/run``).
        model: what validation counts prompt tokens with (the served model), when
            ``prompts`` are given.

    Raises:
        RequestProblem: 413 past a limit, 400 for anything else.
    """
    if not isinstance(document, dict):
        raise RequestProblem(400, [_problem(where, f"must be a graph document (a JSON object), got "
                                                   f"{type(document).__name__}",
                                            "send graph.to_json() parsed, e.g. json.loads(graph.to_json())")])
    text = json.dumps(document)
    if len(text) > limits.document_bytes:
        raise RequestProblem(413, [_problem(where, f"the graph document is {len(text):,} bytes, over the server's "
                                                   f"limit of {limits.document_bytes:,}",
                                            "send a smaller graph, or start the server with a larger "
                                            "--max-document-bytes")])
    try:
        graph = Graph.from_json(text)
    except GraphFormatError as err:
        raise RequestProblem(400, [_problem(f"{where} {path}", message,
                                            "fix the document (nnterp.dsl.from_json reads it the same way)")
                                   for path, message in err.problems]) from None
    too_big = []
    if len(graph) > limits.nodes:
        too_big.append(_problem(where, f"the graph has {len(graph)} nodes, over the server's limit of {limits.nodes}",
                                "split the graph, or start the server with a larger --max-nodes"))
    tensors = _tensor_bytes(graph)
    if tensors > limits.tensor_bytes:
        too_big.append(_problem(where, f"the graph's tensors take {tensors:,} bytes, over the server's limit of "
                                       f"{limits.tensor_bytes:,}",
                                "send smaller tensors, or start the server with a larger --max-tensor-bytes"))
    if too_big:
        raise RequestProblem(413, too_big)
    found = []
    limit = spec.max_model_len or 2**31
    for i, node in enumerate(graph):
        positions = getattr(node, "positions", None)
        listed = (positions,) if isinstance(positions, int) else (positions or ())
        if len(listed) > limits.nodes * 64 or any(abs(p) >= limit for p in listed):
            found.append(_problem(f"{where} nodes[{i}] {type(node).__name__}.positions",
                                  f"positions must be fewer than {limits.nodes * 64} and within "
                                  f"-{limit} .. {limit - 1} (the model's context)", "name positions a prompt has"))
        if isinstance(node, Patch) and node.value is not None and len(node.value.shape) == 2 \
                and node.value.shape[0] > 1 and positions is None:
            found.append(_problem(f"{where} nodes[{i}] Patch.positions",
                                  f"a value of {node.value.shape[0]} rows patches that many positions: name them",
                                  f"give positions= a list of {node.value.shape[0]} positions"))
        if edits_only and isinstance(node, Patch) and node.source is not None:
            found.append(_problem(f"{where} nodes[{i}] Patch.source",
                                  "a patch from a source prompt runs that prompt first, which a completion does not",
                                  "send the value itself (Patch(value=...)), or use POST /nnterp/run"))
    if edits_only:
        found += [_problem(f"{where} nodes[{i}] {type(node).__name__}",
                           f"{type(node).__name__} records values, which a completion does not return",
                           "send graphs that read to POST /nnterp/run; a completion's graph steers, zeroes or patches")
                  for i, node in enumerate(graph) if isinstance(node, _READS)]
    try:
        validate(graph, model if (prompts is not None and model is not None) else spec, "vllm",
                 prompts=prompts if model is not None else None, sampling=sampling)
    except ValidationError as err:
        found += [_problem(f"{where} {p.where}", p.what, p.fix) for p in err.problems]
    if found:
        raise RequestProblem(400, found)
    return graph


def read_sampling(body: dict, limits: ServeLimits, where: str = "sampling") -> Sampling:
    """A run request's ``sampling`` object (``max_tokens``, ``temperature``, ``top_p``,
    ``seed``), within the limits."""
    raw = body.get("sampling") or {}
    if not isinstance(raw, dict):
        raise RequestProblem(400, [_problem(where, "must be an object", 'e.g. {"max_tokens": 1}')])
    unknown = sorted(set(raw) - {"max_tokens", "temperature", "top_p", "seed"})
    if unknown:
        raise RequestProblem(400, [_problem(f"{where}.{unknown[0]}", "unknown field",
                                            "use max_tokens, temperature, top_p and seed")])
    for name in ("temperature", "top_p"):
        if name in raw and (isinstance(raw[name], bool) or not isinstance(raw[name], (int, float))
                            or not math.isfinite(raw[name])):
            raise RequestProblem(400, [_problem(f"{where}.{name}", "must be a finite number", f"e.g. {name}=1.0")])
    try:
        sampling = Sampling(**raw)
    except (TypeError, ValueError) as err:
        raise RequestProblem(400, [_problem(where, str(err), "see nnterp.dsl.Sampling")]) from None
    if sampling.max_tokens > limits.max_tokens:
        raise RequestProblem(413, [_problem(f"{where}.max_tokens", f"{sampling.max_tokens} is over the server's "
                                                                   f"limit of {limits.max_tokens}",
                                            "ask for fewer tokens")])
    return sampling


def read_run_request(body: Any, spec: ModelSpec, limits: ServeLimits, model: Any) -> tuple[Graph, list[str], Sampling]:
    """``POST /nnterp/run``'s body, ``{"graph": ..., "prompts": [...], "sampling": {...}}``,
    checked whole."""
    if not isinstance(body, dict):
        raise RequestProblem(400, [_problem("$", "the body must be a JSON object",
                                            '{"graph": ..., "prompts": [...], "sampling": {...}}')])
    unknown = sorted(set(body) - {"graph", "prompts", "sampling"})
    if unknown:
        raise RequestProblem(400, [_problem(f"$.{unknown[0]}", "unknown field", "send graph, prompts and sampling")])
    prompts = body.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise RequestProblem(400, [_problem("$.prompts", "must be a non-empty list of strings", '["The capital of"]')])
    if len(prompts) > limits.prompts:
        raise RequestProblem(413, [_problem("$.prompts", f"{len(prompts)} prompts, over the server's limit of "
                                                         f"{limits.prompts}",
                                            "send fewer per request, or start the server with a larger --max-prompts")])
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise RequestProblem(400, [_problem(f"$.prompts[{bad[0]}]", "must be a non-empty string", "remove it")])
    sampling = read_sampling(body, limits, "$.sampling")
    graph = read_graph(body.get("graph"), spec, limits, where="$.graph", prompts=prompts, sampling=sampling,
                       model=model)
    return graph, prompts, sampling
