"""Validation's rules: one generator per invariant, registered per node type.

Each rule looks at one node and its `nnterp.dsl.problem.Context` (the spec, the node's
place in the graph, the run's facts) and yields a `nnterp.dsl.problem.Problem` for each
thing wrong, with what to do instead. `nnterp.dsl.validate` lists the invariants and
runs the rules; `context_problems` checks the run as a whole.
"""

from __future__ import annotations

from typing import Any, Iterator

from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Node, Patch, Read, Steer, Zero
from nnterp.dsl.problem import Context, Problem, RunFacts, rule
from nnterp.dsl.sites import Site
from nnterp.dsl.spec import ModelSpec, backends_supporting
from nnterp.dsl.steps import includes_prompt_pass, reaches_generated_token, steer_steps, wanted_positions
from nnterp.sites import SiteKind

__all__ = ["context_problems", "capacity_problems", "vector_rows_needed", "vector_rows_bound"]


#: the most prompts a problem about prompts lists by index, before "and N more"
_LISTED = 8


def context_problems(spec: ModelSpec, run: RunFacts) -> Iterator[Problem]:
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
def _check_backend_supports(node: Node, ctx: Context) -> Iterator[Problem]:
    node_type = type(node)
    if node_type in ctx.spec.supported:
        return
    limit = ctx.spec.limits.nodes.get(node_type.__name__)
    why = limit.why if limit is not None else "the backend was described without it"
    fix = limit.fix if limit is not None else "run it on a backend that supports it"
    others = [name for name in backends_supporting(node_type) if name != ctx.spec.backend]
    runs_on = f"; it runs on {', '.join(map(repr, others))}" if others else ""
    yield ctx.problem(
        f"{node_type.__name__} is not available on the {ctx.spec.backend} backend ({why}){runs_on}", fix
    )


def _kinds_touched(node: Node) -> Iterator[tuple[SiteKind, str]]:
    """The site kinds a node reads or writes, with the field that names each."""
    if isinstance(node, (Steer, Lens)):
        yield SiteKind.LAYERS_OUTPUT, "layer" if isinstance(node, Steer) else "layers"
    site = getattr(node, "site", None)
    if isinstance(site, Site):
        yield site.kind, "site"
    source = getattr(node, "source", None)
    if isinstance(getattr(source, "site", None), Site):
        yield source.site.kind, "source.site"


@rule(Node)
def _check_site_served(node: Node, ctx: Context) -> Iterator[Problem]:
    # a CUDA-graph engine runs Python only at the sites it hooked when it was compiled
    served = ctx.spec.served_sites
    if served is None:
        return
    for kind, field in _kinds_touched(node):
        if kind is SiteKind.LOGITS or kind in served:
            continue
        names = sorted(k.value for k in served | {kind})
        yield ctx.problem(
            f"{kind.value} is not served by this CUDA-graph engine (it serves "
            f"{', '.join(sorted(k.value for k in served))}): a replayed graph runs no Python except at "
            "the sites named when the model was loaded",
            f"load it with cuda_graphs={names!r}, or without cuda_graphs for an eager engine that serves "
            "every site", field)


def _vectors(node: Node) -> int:
    """How many rows of the engine's vector table a node needs at least: a steer its
    vector, a patch with a value one per row of it."""
    if isinstance(node, Steer):
        return 1
    if isinstance(node, Patch) and node.value is not None:
        shape = node.value.shape
        return shape[0] if len(shape) == 2 else 1
    return 0


def vector_rows_needed(graph: Any) -> int:
    """Rows of the engine's vector table a graph's edits need, at least (several steers
    at one site that act on different tokens may need a row per combination)."""
    return sum(_vectors(node) for node in graph)


def vector_rows_bound(graph: Any) -> int:
    """Rows of the engine's vector table a graph's edits may need, at most: at each site,
    one row per combination of what starts a token's edit (nothing, a zero, a patch row)
    and the steers added after it. What plans installed together may use, so that a
    wave of them never runs out of rows mid-run (`vector_rows_needed` is the least)."""
    sites: dict[Any, tuple[int, int]] = {}
    for node in graph:
        if isinstance(node, Steer):
            key = (SiteKind.LAYERS_OUTPUT, node.layer)
            starts, steers = sites.get(key, (1, 0))
            sites[key] = (starts, steers + 1)
        elif isinstance(node, (Zero, Patch)):
            key = (node.site.kind, node.site.layer)
            starts, steers = sites.get(key, (1, 0))
            sites[key] = (starts + max(1, _vectors(node)), steers)
    return max(_combinations(sites), vector_rows_needed(graph))


def _combinations(sites: dict[Any, tuple[int, int]]) -> int:
    """Rows for every site's ``(starts, steers)``: each start with any subset of the
    steers, less the empty edit (row 0)."""
    return sum(starts * 2 ** min(steers, 16) - 1 for starts, steers in sites.values())


def plan_vector_rows_bound(plan: Any) -> int:
    """`vector_rows_bound` of a lowered plan (its ops name the sites): what a server
    reserves of the engine's table for a plan it installs beside others."""
    from nnterp.dsl.plan import PatchOp, SteerOp, ZeroOp

    sites: dict[Any, tuple[int, int]] = {}
    for op in plan.ops:
        if isinstance(op, SteerOp):
            starts, steers = sites.get(op.site, (1, 0))
            sites[op.site] = (starts, steers + 1)
        elif isinstance(op, (ZeroOp, PatchOp)):
            shape = op.value.shape if isinstance(op, PatchOp) else ()
            starts, steers = sites.get(op.site, (1, 0))
            sites[op.site] = (starts + (shape[0] if len(shape) == 2 else 1), steers)
    return _combinations(sites)


@rule(Node)
def _check_output_name_unique(node: Node, ctx: Context) -> Iterator[Problem]:
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


def _site_range_problem(site: Site, ctx: Context, field: str) -> Iterator[Problem]:
    if site.layer is not None and not _layer_ok(site.layer, ctx.spec):
        yield ctx.problem(
            f"site {str(site)!r} has layer {site.layer}, but this model has "
            f"{ctx.spec.num_layers} layers (valid: {_layer_range(ctx.spec)})",
            f"use a layer in {_layer_range(ctx.spec)}; negative indices count from the end",
            field,
        )


@rule(Read, Zero, Patch, Grad)
def _check_site_in_range(node: Any, ctx: Context) -> Iterator[Problem]:
    yield from _site_range_problem(node.site, ctx, "site")


@rule(Patch)
def _check_source_site_in_range(node: Patch, ctx: Context) -> Iterator[Problem]:
    if node.source is not None and node.source.site is not None:
        yield from _site_range_problem(node.source.site, ctx, "source.site")


@rule(Steer, AttentionProbs)
def _check_layer_in_range(node: Any, ctx: Context) -> Iterator[Problem]:
    if not _layer_ok(node.layer, ctx.spec):
        yield ctx.problem(
            f"layer {node.layer} is out of range for a model with {ctx.spec.num_layers} "
            f"layers (valid: {_layer_range(ctx.spec)})",
            f"use a layer in {_layer_range(ctx.spec)}; negative indices count from the end",
            "layer",
        )


@rule(Lens)
def _check_lens_layers_in_range(node: Lens, ctx: Context) -> Iterator[Problem]:
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
def _check_top_k(node: Lens, ctx: Context) -> Iterator[Problem]:
    if node.top_k is not None and node.top_k > ctx.spec.vocab_size:
        yield ctx.problem(
            f"top_k={node.top_k} exceeds this model's vocab_size {ctx.spec.vocab_size}",
            f"use top_k <= {ctx.spec.vocab_size}, or top_k=None for the full distribution",
            "top_k",
        )


@rule(Steer)
def _check_vector_width(node: Steer, ctx: Context) -> Iterator[Problem]:
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
def _check_value_width(node: Patch, ctx: Context) -> Iterator[Problem]:
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
def _check_source_site_width(node: Patch, ctx: Context) -> Iterator[Problem]:
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
def _check_attention_probs_enabled(node: AttentionProbs, ctx: Context) -> Iterator[Problem]:
    if AttentionProbs in ctx.spec.supported and not ctx.spec.attention_probs_enabled:
        yield ctx.problem(
            "the model was loaded without attention probabilities (its attention kernel "
            "never materialises them)",
            "load it with StandardizedTransformer(name, enable_attention_probs=True)",
        )


@rule(Grad)
def _check_grad_target_nonempty(node: Grad, ctx: Context) -> Iterator[Problem]:
    if isinstance(node.target, str) and not node.target:
        yield ctx.problem(
            "target is the empty string, which has no token to take the gradient of",
            "pass the target token's text (e.g. ' Paris') or its token id",
            "target",
        )


@rule(Grad)
def _check_grad_target_in_vocab(node: Grad, ctx: Context) -> Iterator[Problem]:
    if isinstance(node.target, int) and node.target >= ctx.spec.vocab_size:
        yield ctx.problem(
            f"target token id {node.target} is outside the vocabulary (vocab_size "
            f"{ctx.spec.vocab_size})",
            f"use a token id below {ctx.spec.vocab_size}, or the token's text",
            "target",
        )


@rule(Steer, Patch)
def _check_finite(node: Any, ctx: Context) -> Iterator[Problem]:
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
def _check_patch_rows(node: Patch, ctx: Context) -> Iterator[Problem]:
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
def _check_generation_positions(node: Any, ctx: Context) -> Iterator[Problem]:
    if includes_prompt_pass(node.steps) or reaches_generated_token(node.positions):
        return
    yield ctx.problem(
        f"positions={node.positions!r} at steps={node.steps!r}: each generation step's "
        "forward pass holds only the new token (position -1), so nothing would be read",
        "use positions=-1 (or None) for generation steps, or add step 0 to read the prompt",
        "positions",
    )


@rule(Read, Zero, Patch)
def _check_logits_positions(node: Any, ctx: Context) -> Iterator[Problem]:
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
def _check_positions_in_prompts(node: Any, ctx: Context) -> Iterator[Problem]:
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
def _check_source_position(node: Patch, ctx: Context) -> Iterator[Problem]:
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
def _check_source_alignment(node: Patch, ctx: Context) -> Iterator[Problem]:
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
def _check_steps_generated(node: Any, ctx: Context) -> Iterator[Problem]:
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
def _check_grad_single_pass(node: Grad, ctx: Context) -> Iterator[Problem]:
    if ctx.run is not None and ctx.run.max_tokens > 1:
        yield ctx.problem(
            f"Grad takes the gradient of one forward pass, but the run generates "
            f"{ctx.run.max_tokens} tokens",
            "run it with Sampling(max_tokens=1), and generate in a separate run",
        )


# -- public entry point ----------------------------------------------------------------


def capacity_problems(graph: Any, spec: ModelSpec) -> Iterator[Problem]:
    """A graph whose edits need more vectors than the engine's table holds (vLLM's
    batched executor: ``vector_rows``, one row of which is the zero vector)."""
    if spec.vector_rows is None:
        return
    needed = vector_rows_needed(graph)
    if needed > spec.vector_rows - 1:
        yield Problem("graph", f"the graph's steering and patch vectors need at least {needed} rows of the "
                      f"engine's vector table, which holds {spec.vector_rows - 1}",
                      f"load the model with StandardizedTransformer(..., backend='vllm', vector_rows={needed + 1}) "
                      "or more, or split the graph")
