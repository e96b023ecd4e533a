"""Validation: check a graph against a model's `ModelSpec` before anything runs.

Invariants checked (one rule each, registered per node type with `rule`):

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
from typing import Any, Callable, Iterator, Sequence

import attrs

from nnterp.limits import BACKENDS, DEFAULT_BACKEND, limits_for
from nnterp.dsl.config_spec import spec_for_name, tokenizer_for_name
from nnterp.dsl.graph import Graph, as_graph
from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Node, Patch, Read, Steer, Zero
from nnterp.dsl.plan import Prompts
from nnterp.dsl.sites import Site
from nnterp.dsl.spec import ModelSpec, supported_by
from nnterp.dsl.steps import includes_prompt_pass, reaches_generated_token, steer_steps, wanted_positions
from nnterp.errors import ModelNotFoundError, NnterpError, ValidationError
from nnterp.sites import SiteKind

__all__ = ["Problem", "problems", "validate", "rule"]


@attrs.frozen
class Problem:
    """One thing wrong with a graph for a model.

    Args:
        where: the node and field, e.g. ``"nodes[1] Steer.vector"`` (or ``"model"``
            for a problem with the model itself).
        what: what is wrong, with the value received and the rule it broke.
        fix: one concrete way to fix it.
        node_index: the node's index in the graph, or None.
        node: the node itself (not part of equality: ``node_index`` identifies it).

    Example:
        >>> from nnterp.dsl import Graph, Steer, ModelSpec, validate, ValidationError
        >>> spec = ModelSpec(num_layers=4, hidden_size=8, num_heads=2, vocab_size=100)
        >>> try:
        ...     validate(Graph([Steer(9, [0.0] * 3)]), spec)
        ... except ValidationError as err:
        ...     for p in err.problems:
        ...         print(p.node_index, p.where)
        0 nodes[0] Steer.layer
        0 nodes[0] Steer.vector
    """

    where: str
    what: str
    fix: str
    node_index: int | None = None
    node: Node | None = attrs.field(default=None, kw_only=True, eq=False, repr=False)

    @property
    def message(self) -> str:
        return f"{self.what}; {self.fix}"

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; fix: {self.fix}"


@attrs.frozen
class RunFacts:
    """What a run adds to the model: its prompts' lengths and its sampling.

    Args:
        prompt_lengths: tokens in each prompt, as the model's tokenizer counts them.
        source_lengths: tokens in each ``Patch(source=...)`` prompt, by prompt text.
        max_tokens: tokens the run generates (``Sampling.max_tokens``).
    """

    prompt_lengths: tuple[int, ...] = ()
    source_lengths: tuple[tuple[str, int], ...] = ()
    max_tokens: int = 1


@attrs.frozen
class _Context:
    """What a rule may look at besides the node: the spec, the node's place in the
    graph, the output names used by earlier nodes (name -> index), and the run's facts
    when validating for a run."""

    spec: ModelSpec
    index: int
    node: Node
    earlier_names: tuple[tuple[str, int], ...]
    run: RunFacts | None = None

    def problem(self, what: str, fix: str, field: str | None = None) -> Problem:
        where = f"nodes[{self.index}] {type(self.node).__name__}"
        if field is not None:
            where = f"{where}.{field}"
        return Problem(where, what, fix, self.index, node=self.node)


Rule = Callable[[Any, _Context], Iterator[Problem]]
#: node type -> rules registered for it, in registration order.
_RULES: dict[type[Node], list[Rule]] = {}


def rule(*node_types: type[Node]) -> Callable[[Rule], Rule]:
    """Register a generator ``rule(node, ctx)`` yielding `Problem` for these node types.

    Rules registered for `Node` apply to every node.
    """

    def register(function: Rule) -> Rule:
        for node_type in node_types:
            _RULES.setdefault(node_type, []).append(function)
        return function

    return register


def _rules_for(node_type: type[Node]) -> list[Rule]:
    # Node-wide rules first, then those of more specific classes.
    out: list[Rule] = []
    for cls in reversed(node_type.__mro__):
        out.extend(_RULES.get(cls, ()))
    return out


def problems(graph: Graph, spec: ModelSpec, run: RunFacts | None = None) -> tuple[Problem, ...]:
    """Every problem of ``graph`` for ``spec`` (and ``run``'s prompts and sampling, when
    given), in graph order; never raises for a user mistake."""
    found: list[Problem] = []
    names: dict[str, int] = {}
    for index, node in enumerate(graph):
        ctx = _Context(spec, index, node, tuple(names.items()), run)
        for check in _rules_for(type(node)):
            found.extend(check(node, ctx))
        name = node.output_name
        if name is not None and name not in names:
            names[name] = index
    if run is not None:
        found.extend(_context_problems(spec, run))
    return tuple(found)


#: the most prompts a problem about prompts lists by index, before "and N more"
_LISTED = 8


def _context_problems(spec: ModelSpec, run: RunFacts) -> Iterator[Problem]:
    """Prompts that, with the tokens the run generates, exceed the model's context. vLLM
    stops such a sequence at its ``max_model_len`` and says nothing: the run would return
    fewer tokens than asked, or none."""
    limit = spec.max_model_len
    if limit is None:
        return
    over = [(row, length) for row, length in enumerate(run.prompt_lengths) if length + run.max_tokens > limit]
    if not over:
        return
    listed = ", ".join(f"prompts[{row}] ({length} tokens)" for row, length in over[:_LISTED])
    more = f" and {len(over) - _LISTED} more" if len(over) > _LISTED else ""
    longest = max(length for _, length in over)
    room = limit - longest
    fix = (f"lower max_tokens to {room}" if room >= 1 else "shorten the prompts") + \
        ", shorten the prompts, or load the model with a larger max_model_len (and KV cache)"
    yield Problem("prompts", f"{listed}{more}: the prompt and the {run.max_tokens} tokens to generate exceed "
                  f"the model's context of {limit} tokens, where generation would stop early without a word",
                  fix)


# -- rules -----------------------------------------------------------------------------


def _layer_range(spec: ModelSpec) -> str:
    return f"{-spec.num_layers} .. {spec.num_layers - 1}"


def _layer_ok(layer: int, spec: ModelSpec) -> bool:
    return -spec.num_layers <= layer < spec.num_layers


@rule(Node)
def _check_backend_supports(node: Node, ctx: _Context) -> Iterator[Problem]:
    node_type = type(node)
    if node_type in ctx.spec.supported:
        return
    limit = ctx.spec.limits.nodes.get(node_type.__name__)
    why = limit.why if limit is not None else "the backend was described without it"
    fix = limit.fix if limit is not None else "run it on a backend that supports it"
    yield ctx.problem(
        f"{node_type.__name__} is not available on the {ctx.spec.backend} backend ({why})", fix
    )


@rule(Node)
def _check_output_name_unique(node: Node, ctx: _Context) -> Iterator[Problem]:
    name = node.output_name
    if name is None:
        return
    for earlier, index in ctx.earlier_names:
        if earlier == name:
            other = type(ctx.node).__name__
            yield ctx.problem(
                f"output name {name!r} is already used by nodes[{index}]; results are "
                "keyed by name, so one would hide the other",
                f"give this {other} a different name, e.g. name={name + '_2'!r}",
            )
            return


def _site_range_problem(site: Site, ctx: _Context, field: str) -> Iterator[Problem]:
    if site.layer is not None and not _layer_ok(site.layer, ctx.spec):
        yield ctx.problem(
            f"site {str(site)!r} has layer {site.layer}, but this model has "
            f"{ctx.spec.num_layers} layers (valid: {_layer_range(ctx.spec)})",
            f"use a layer in {_layer_range(ctx.spec)}; negative indices count from the end",
            field,
        )


@rule(Read, Zero, Patch, Grad)
def _check_site_in_range(node: Any, ctx: _Context) -> Iterator[Problem]:
    yield from _site_range_problem(node.site, ctx, "site")


@rule(Patch)
def _check_source_site_in_range(node: Patch, ctx: _Context) -> Iterator[Problem]:
    if node.source is not None and node.source.site is not None:
        yield from _site_range_problem(node.source.site, ctx, "source.site")


@rule(Steer, AttentionProbs)
def _check_layer_in_range(node: Any, ctx: _Context) -> Iterator[Problem]:
    if not _layer_ok(node.layer, ctx.spec):
        yield ctx.problem(
            f"layer {node.layer} is out of range for a model with {ctx.spec.num_layers} "
            f"layers (valid: {_layer_range(ctx.spec)})",
            f"use a layer in {_layer_range(ctx.spec)}; negative indices count from the end",
            "layer",
        )


@rule(Lens)
def _check_lens_layers_in_range(node: Lens, ctx: _Context) -> Iterator[Problem]:
    if node.layers == "all":
        return
    layers = (node.layers,) if isinstance(node.layers, int) else node.layers
    bad = [layer for layer in layers if not _layer_ok(layer, ctx.spec)]
    if bad:
        yield ctx.problem(
            f"layers {bad} are out of range for a model with {ctx.spec.num_layers} layers "
            f"(valid: {_layer_range(ctx.spec)})",
            f"use layers in {_layer_range(ctx.spec)}, or layers='all'",
            "layers",
        )


@rule(Lens)
def _check_top_k(node: Lens, ctx: _Context) -> Iterator[Problem]:
    if node.top_k is not None and node.top_k > ctx.spec.vocab_size:
        yield ctx.problem(
            f"top_k={node.top_k} exceeds this model's vocab_size {ctx.spec.vocab_size}",
            f"use top_k <= {ctx.spec.vocab_size}, or top_k=None for the full distribution",
            "top_k",
        )


@rule(Steer)
def _check_vector_width(node: Steer, ctx: _Context) -> Iterator[Problem]:
    width = node.vector.shape[0]
    if width != ctx.spec.hidden_size:
        yield ctx.problem(
            f"steering vector has {width} features but this model's hidden_size is "
            f"{ctx.spec.hidden_size}",
            f"build the vector from this model's layers_output ({ctx.spec.hidden_size} features)",
            "vector",
        )


def _width(site: Site, spec: ModelSpec) -> int:
    return spec.vocab_size if site.width == "vocab_size" else spec.hidden_size


@rule(Patch)
def _check_value_width(node: Patch, ctx: _Context) -> Iterator[Problem]:
    if node.value is None:
        return
    expected = _width(node.site, ctx.spec)
    got = node.value.shape[-1]
    if got != expected:
        yield ctx.problem(
            f"value {node.value!r} ends in {got}, but {str(node.site)!r} has "
            f"{node.site.width} {expected}",
            f"pass a value whose last dimension is {expected}, e.g. one read from "
            f"{str(node.site)!r} of this model",
            "value",
        )


@rule(Patch)
def _check_source_site_width(node: Patch, ctx: _Context) -> Iterator[Problem]:
    if node.source is None or node.source.site is None:
        return
    source, target = node.source.site, node.site
    if source.width != target.width:
        yield ctx.problem(
            f"source site {str(source)!r} has width {source.width} "
            f"({_width(source, ctx.spec)}) but the patched site {str(target)!r} has "
            f"{target.width} ({_width(target, ctx.spec)})",
            "patch logits only from logits, and hidden-size sites only from hidden-size "
            "sites; or omit source.site to read the patched site",
            "source.site",
        )


@rule(AttentionProbs)
def _check_attention_probs_enabled(node: AttentionProbs, ctx: _Context) -> Iterator[Problem]:
    if AttentionProbs in ctx.spec.supported and not ctx.spec.attention_probs_enabled:
        yield ctx.problem(
            "the model was loaded without attention probabilities (its attention kernel "
            "never materialises them)",
            "load it with StandardizedTransformer(name, enable_attention_probs=True)",
        )


@rule(Grad)
def _check_grad_target_nonempty(node: Grad, ctx: _Context) -> Iterator[Problem]:
    if isinstance(node.target, str) and not node.target:
        yield ctx.problem(
            "target is the empty string, which has no token to take the gradient of",
            "pass the target token's text (e.g. ' Paris') or its token id",
            "target",
        )


@rule(Grad)
def _check_grad_target_in_vocab(node: Grad, ctx: _Context) -> Iterator[Problem]:
    if isinstance(node.target, int) and node.target >= ctx.spec.vocab_size:
        yield ctx.problem(
            f"target token id {node.target} is outside the vocabulary (vocab_size "
            f"{ctx.spec.vocab_size})",
            f"use a token id below {ctx.spec.vocab_size}, or the token's text",
            "target",
        )


@rule(Steer, Patch)
def _check_finite(node: Any, ctx: _Context) -> Iterator[Problem]:
    field = "vector" if isinstance(node, Steer) else "value"
    tensor = getattr(node, field)
    bad = 0 if tensor is None else tensor.count_non_finite()
    if bad:
        yield ctx.problem(
            f"{field} {tensor!r} holds {bad} NaN or infinite values, which would turn every "
            "activation it touches into NaN",
            f"pass a finite {field}; check how it was computed (e.g. a norm of zero)",
            field,
        )


def _position_count(positions: Any) -> int | None:
    if positions is None:
        return None
    return 1 if isinstance(positions, int) else len(positions)


@rule(Patch)
def _check_patch_rows(node: Patch, ctx: _Context) -> Iterator[Problem]:
    value = node.value
    if value is None or value.ndim < 2 or value.shape[-1] != _width(node.site, ctx.spec):
        return  # a vector is written at every patched position; a wrong width is reported
    rows = value.numel // value.shape[-1]
    wanted = _position_count(node.positions)
    lengths = ctx.run.prompt_lengths if ctx.run is not None and wanted is None else ()
    if wanted is not None and rows != wanted:
        yield ctx.problem(
            f"value {value!r} has {rows} rows but positions={node.positions!r} names {wanted}",
            "give one row per position, or a vector to write at every position",
            "value",
        )
    elif any(rows != n for n in lengths):
        yield ctx.problem(
            f"value {value!r} has {rows} rows but positions=None patches every token, and "
            f"the prompts have {sorted(set(lengths))} tokens",
            "give one row per token of every prompt, or a vector, or name the positions",
            "value",
        )


def _steps_of(node: Node) -> Any:
    if isinstance(node, (Read, Lens)):
        return node.steps
    if isinstance(node, Steer):
        return steer_steps(node.positions)
    return 0


@rule(Read, Lens)
def _check_generation_positions(node: Any, ctx: _Context) -> Iterator[Problem]:
    if includes_prompt_pass(node.steps) or reaches_generated_token(node.positions):
        return
    yield ctx.problem(
        f"positions={node.positions!r} at steps={node.steps!r}: each generation step's "
        "forward pass holds only the new token (position -1), so nothing would be read",
        "use positions=-1 (or None) for generation steps, or add step 0 to read the prompt",
        "positions",
    )


@rule(Read, Zero, Patch)
def _check_logits_positions(node: Any, ctx: _Context) -> Iterator[Problem]:
    if node.site.kind is not SiteKind.LOGITS or node.positions is None:
        return
    wanted = (node.positions,) if isinstance(node.positions, int) else node.positions
    if any(p not in (0, -1) for p in wanted):
        yield ctx.problem(
            f"positions={node.positions!r} at 'logits': logits exist only at the last position, "
            "where the next token is sampled (on both backends)",
            "use positions=-1; to see another position's prediction, run a Lens there or "
            "run that prefix of the prompt",
            "positions",
        )


@rule(Read, Lens, Zero, Patch, Steer, Grad)
def _check_positions_in_prompts(node: Any, ctx: _Context) -> Iterator[Problem]:
    if ctx.run is None or node.positions is None or not includes_prompt_pass(_steps_of(node)):
        return
    wanted = wanted_positions(node.positions)
    # a prompt of n tokens has positions -n .. n-1: it must have at least `need` tokens
    need = max((p + 1 if p >= 0 else -p for p in wanted), default=0)
    if not ctx.run.prompt_lengths or min(ctx.run.prompt_lengths) >= need:
        return  # the common case, checked in one pass over a sweep of thousands of prompts
    short = [(i, n) for i, n in enumerate(ctx.run.prompt_lengths) if n < need]
    if short:
        shortest = min(n for _, n in short)
        listed = ", ".join(f"prompts[{i}] ({n} tokens)" for i, n in short[:3])
        more = f" and {len(short) - 3} more" if len(short) > 3 else ""
        yield ctx.problem(
            f"positions {list(wanted)} are outside {listed}{more}; a prompt of n tokens has "
            "positions -n .. n-1",
            f"use positions every prompt has (e.g. -1, or within {-shortest} .. {shortest - 1}), "
            "or run the short prompts separately",
            "positions",
        )


@rule(Patch)
def _check_source_position(node: Patch, ctx: _Context) -> Iterator[Problem]:
    if ctx.run is None or node.source is None:
        return
    n = dict(ctx.run.source_lengths).get(node.source.prompt)
    if n is None:
        return
    wanted = node.source.position
    outside = [p for p in ((wanted,) if isinstance(wanted, int) else wanted or ()) if not -n <= p < n]
    if outside:
        yield ctx.problem(
            f"source position{'s' if len(outside) > 1 else ''} {', '.join(map(str, outside))} "
            f"{'are' if len(outside) > 1 else 'is'} outside the source prompt {node.source.prompt!r:.60} ({n} tokens)",
            f"use positions in {-n} .. {n - 1} (e.g. -1, its last token)",
            "source.position",
        )
    if wanted is None and node.positions is None:
        differ = sorted({length for length in ctx.run.prompt_lengths if length != n})
        if differ:
            yield ctx.problem(
                f"Source(position=None) patches every token one to one, but the source prompt has {n} "
                f"tokens and the prompts have {differ}",
                "give prompts of the source's length, or name the positions on both sides "
                "(Source(position=[...]) and positions=[...] of the same length)",
                "source.position",
            )


@rule(Patch)
def _check_source_alignment(node: Patch, ctx: _Context) -> Iterator[Problem]:
    """How the source's positions meet the patch's: see `nnterp.dsl.nodes.Source`."""
    if node.source is None:
        return
    source, target = node.source.position, node.positions
    if isinstance(source, int) and target is None:
        yield ctx.problem(
            "positions=None with Source(position=...) of one token would write that one token's activation at "
            "every position of the prompt",
            "patch one token (positions=-1, the default), or patch token by token: Source(position=[...]) "
            "with positions=[...] of the same length, or Source(position=None) with positions=None",
            "positions",
        )
    elif source is None and target is not None:
        yield ctx.problem(
            f"Source(position=None) takes every token of the source prompt, but positions={target!r} "
            "names only some",
            "give positions=None to patch every token one to one, or name the source's positions",
            "source.position",
        )
    elif isinstance(source, tuple) and (target is None or isinstance(target, int)
                                        or len(target) != len(source)):
        names = "every token" if target is None else f"{1 if isinstance(target, int) else len(target)} position(s)"
        yield ctx.problem(
            f"Source(position={list(source)}) takes {len(source)} tokens, one for each patched position, but "
            f"positions={target!r} names {names}",
            f"give positions a list of {len(source)} positions, in the order the source's are listed",
            "positions",
        )


@rule(Read, Lens)
def _check_steps_generated(node: Any, ctx: _Context) -> Iterator[Problem]:
    if ctx.run is None or node.steps == "all":
        return
    steps = (node.steps,) if isinstance(node.steps, int) else node.steps
    last = ctx.run.max_tokens - 1
    beyond = [step for step in steps if step > last]
    if beyond:
        yield ctx.problem(
            f"steps {beyond} come after the run's last forward pass: generating "
            f"{ctx.run.max_tokens} tokens runs steps 0 .. {last}",
            f"generate more tokens (Sampling(max_tokens={max(beyond) + 1})), or use steps <= {last}",
            "steps",
        )


@rule(Grad)
def _check_grad_single_pass(node: Grad, ctx: _Context) -> Iterator[Problem]:
    if ctx.run is not None and ctx.run.max_tokens > 1:
        yield ctx.problem(
            f"Grad takes the gradient of one forward pass, but the run generates "
            f"{ctx.run.max_tokens} tokens",
            "run it with Sampling(max_tokens=1), and generate in a separate run",
        )


# -- public entry point ----------------------------------------------------------------


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
        2. nodes[1] Grad: Grad is not available on the vllm backend (vLLM runs inference kernels that keep no autograd graph); fix: run this graph on the HF backend: StandardizedTransformer(name, backend='hf')
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
