"""Validation: check a graph against a model's `ModelSpec` before anything runs.

Invariants checked (one rule each in `nnterp.dsl.rules`, registered per node type with
`rule`):

* every layer index (of a site, a ``Steer``, an ``AttentionProbs``, a ``Lens`` layer)
  is within ``-num_layers .. num_layers - 1``;
* ``Steer`` vectors have ``hidden_size`` features, and ``Patch`` values have the site's
  width in their last dimension (``vocab_size`` for ``logits``, else ``hidden_size``),
  one row per patched position, and only finite numbers;
* a ``Patch`` source site has the same width as the patched site;
* output names are unique in the graph;
* the backend runs the node type (its own `nnterp.limits` table says why not
  and what to do instead), and ``AttentionProbs`` has a model loaded with
  ``enable_attention_probs=True``;
* ``Lens.top_k`` is at most ``vocab_size``; a ``Grad`` target is a non-empty string or
  a token id below ``vocab_size``;
* a node that acts only at generation steps asks for no prompt position: each of
  those forward passes holds one token.

Given the prompts and sampling of a run (``run`` always passes them), also: every
position exists in every prompt (and a source position in its source prompt), every
step is one the run generates, and ``Grad`` runs on one forward pass.

Malformed sites, types, signs and tensor ranks never get here: nodes refuse them when
they are built. `problems` collects every problem and never raises for a user mistake
(a rule that raises is an nnterp bug); `validate` raises one `ValidationError` listing
all of them, in graph order, so a user fixes a graph in one round.

This module never imports nnsight, vllm, transformers, json or the backends' code;
reading a configuration by model name goes through `nnterp.dsl.config_spec`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import attrs

from nnterp.dsl.config_spec import spec_for_name, tokenizer_for_name
from nnterp.dsl.graph import Graph, as_graph
from nnterp.dsl.nodes import Node, Patch
from nnterp.dsl.plan import Prompts
from nnterp.dsl.problem import Context, Problem, RunFacts, rule, rules_for
from nnterp.dsl.rules import capacity_problems, context_problems
from nnterp.dsl.spec import ModelSpec, supported_by
from nnterp.errors import ModelNotFoundError, NnterpError, ValidationError
from nnterp.limits import BACKENDS, DEFAULT_BACKEND, limits_for
from nnterp.remote import RemoteModel, is_url

__all__ = ["Problem", "RunFacts", "problems", "validate", "rule"]


def problems(graph: Graph, spec: ModelSpec, run: RunFacts | None = None) -> tuple[Problem, ...]:
    """Every problem of ``graph`` for ``spec`` (and ``run``'s prompts and sampling, when
    given), in graph order; never raises for a user mistake."""
    found: list[Problem] = []
    names: dict[str, int] = {}
    for index, node in enumerate(graph):
        ctx = Context(spec, index, node, tuple(names.items()), run)
        for check in rules_for(type(node)):
            found.extend(check(node, ctx))
        name = node.output_name
        if name is not None and name not in names:
            names[name] = index
    found.extend(capacity_problems(graph, spec))
    if run is not None:
        found.extend(context_problems(spec, run))
    return tuple(found)


def _model_problem(what: str, fix: str) -> ValidationError:
    return ValidationError([Problem("model", what, fix)], header="cannot validate the graph:")


def _spec_for(model: Any, backend: str | None) -> ModelSpec:
    if backend is not None:
        try:
            limits_for(backend)
        except ValueError as err:
            raise _model_problem(str(err), f"pass backend= one of {', '.join(map(repr, BACKENDS))}, "
                                 "or None") from None
    if isinstance(model, ModelSpec):
        if backend is None or backend == model.backend:
            return model
        # A hand-written spec describes sizes; asking for another backend re-derives
        # what runs there.
        return attrs.evolve(
            model,
            backend=backend,
            supported=supported_by(backend),
            attention_probs_enabled=model.attention_probs_enabled and limits_for(backend).reads_attention_probabilities,
        )
    if is_url(model):  # a server describes the model it serves (`nnterp.remote`)
        spec = RemoteModel(model).spec()
        if backend is not None and backend != spec.backend:
            raise _model_problem(f"the server at {model} serves a {spec.backend} model, not {backend}",
                                 "leave backend=None, or validate against a server of that backend")
        return spec
    if isinstance(model, (str, os.PathLike)):
        return _name_call(model, spec_for_name, backend or DEFAULT_BACKEND)
    try:
        spec = ModelSpec.from_model(model)
    except TypeError as err:
        raise TypeError(f"validate(graph, model): {err}") from err
    if backend is not None and backend != spec.backend:
        raise _model_problem(
            f"the model was loaded with backend {spec.backend!r} but backend={backend!r} "
            "was asked",
            f"load it with StandardizedTransformer(name, backend={backend!r}), or leave "
            "backend=None",
        )
    return spec


def _name_call(name: Any, function: Callable[..., Any], *args: Any) -> Any:
    """``function(name, *args)``, with any failure to read the model's files reported
    as a problem with the model."""
    try:
        return function(name, *args)
    except ModelNotFoundError as err:
        what, _, fix = str(err).partition("; ")
        raise _model_problem(what, fix) from None
    except NnterpError:
        raise  # e.g. BundledModelError, which already says how to fix it
    except Exception as err:
        # transformers and huggingface_hub raise many types for an unreadable or
        # invalid configuration (OSError, ValueError, their own validation errors).
        raise _model_problem(
            f"could not read model {os.fspath(name)!r:.200} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            "pass a local folder holding a config.json, a Hugging Face model name "
            "already in the local cache, or 'bundled'",
        ) from err


def _run_facts(graph: Graph, model: Any, prompts: Sequence[str] | None,
               sampling: Any) -> RunFacts | None:
    if prompts is None and sampling is None:
        return None
    lengths: tuple[int, ...] = ()
    sources: tuple[tuple[str, int], ...] = ()
    if prompts is not None:
        if isinstance(model, ModelSpec):
            raise TypeError("validate(..., prompts=...) counts tokens with the model's tokenizer; "
                            "pass a loaded model or a model name instead of a ModelSpec")
        if isinstance(model, (str, os.PathLike)):
            tokenizer = _name_call(model, tokenizer_for_name)
        else:
            tokenizer = model.tokenizer
        source_prompts = sorted({n.source.prompt for n in graph if isinstance(n, Patch) and n.source is not None})
        # one batch call: a sweep of thousands of prompts is tokenized in parallel (run
        # passes them tokenized already)
        lengths = tuple(len(ids) for ids in Prompts.of(prompts, tokenizer).token_ids)
        sources = tuple(zip(source_prompts, map(len, Prompts.tokenize(source_prompts, tokenizer).token_ids)))
    max_tokens = getattr(sampling, "max_tokens", 1)
    return RunFacts(prompt_lengths=lengths, source_lengths=sources, max_tokens=max_tokens)


def validate(graph: Graph | Node, model: Any, backend: str | None = None, *,
             prompts: Sequence[str] | None = None, sampling: Any = None) -> ModelSpec:
    """Check ``graph`` against a model without running it.

    Args:
        graph: a `Graph` (or a single node).
        model: a loaded `StandardizedTransformer`, a `ModelSpec`, or a model name or
            path (``"bundled"`` included), of which only the configuration is read: no
            weights, no engine. A model loaded by name is assumed to be loaded the way
            the graph needs (``run`` enables attention probabilities on HF when the
            graph asks for them).
        backend: ``"hf"`` or ``"vllm"``; for a loaded model it must match the model's,
            for a name it defaults to ``"hf"``, for a spec it replaces the spec's.
        prompts: the prompts of a run: every position must exist in each of them
            (tokens are counted with the model's tokenizer: a loaded model or a name).
        sampling: the `Sampling` of a run (``Grad`` needs ``max_tokens=1``).

    Returns:
        The `ModelSpec` the graph was checked against.

    Raises:
        ValidationError: listing every problem, in graph order (``.problems``); also
            when the model's configuration cannot be read or the backend does not match.
        TypeError: ``graph`` is not a graph or node, or ``model`` is none of the above.

    Example:
        >>> from nnterp.dsl import Grad, Lens, ModelSpec, Read, validate, ValidationError
        >>> spec = ModelSpec(num_layers=30, hidden_size=576, num_heads=9,
        ...                  vocab_size=49152, backend="vllm")
        >>> validate(Read("layers[-1].output") >> Lens(top_k=10), spec).num_layers
        30
        >>> try:
        ...     validate(Read("layers[30].output") >> Grad("layers[2].output", 11), spec)
        ... except ValidationError as err:
        ...     print(err)
        the graph has 2 problems for vllm model (30 layers, hidden_size 576):
        1. nodes[0] Read.site: site 'layers[30].output' has layer 30, but this model has 30 layers (valid: -30 .. 29); fix: use a layer in -30 .. 29; negative indices count from the end
        2. nodes[1] Grad: Grad is not available on the vllm backend (vLLM runs inference kernels that keep no autograd graph); it runs on 'hf'; fix: run this graph on the HF backend: StandardizedTransformer(name, backend='hf')
    """
    graph = as_graph(graph)
    spec = _spec_for(model, backend)
    found = problems(graph, spec, _run_facts(graph, model, prompts, sampling))
    if found:
        noun = "problem" if len(found) == 1 else "problems"
        raise ValidationError(
            found, header=f"the graph has {len(found)} {noun} for {spec.describe()}:"
        )
    return spec
