"""Lowering: a validated graph becomes a `Plan`, an ordered listing of site operations.

nnsight serves activations in model order, so every operation is placed at its site's
position in the forward pass (`nnterp.sites.SiteKind.order`), and operations at one
site keep their graph order. Each node type has one lowering rule, registered with
`lowers` as validation rules are with ``rule``; a rule yields the node's operations
and, when the node has a named output, its `Output`:

* `Read`, `Zero`, `Steer` and a constant-value `Patch` act at their site;
* `Lens` reads ``layers[l].output`` of each chosen layer, projected where it is read;
* `AttentionProbs` reads inside the attention of its layer;
* `Grad` keeps its site's activation, and takes the gradient once the logits exist.

``Patch(source=...)`` is not lowered: ``run`` first runs the source prompts and turns
such patches into constant-value ones. The plan is backend-independent: a backend runs
it with ``Backend.execute``. This module never imports a backend.
"""

from __future__ import annotations

from typing import Callable, Iterator

import attrs

from nnterp.dsl.graph import Graph
from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Node, Patch, Read, Steer, Zero
from nnterp.dsl.plan import (
    AttentionProbsOp,
    GradCaptureOp,
    GradOp,
    LensOp,
    Op,
    Output,
    OutputKind,
    PatchOp,
    Plan,
    ReadOp,
    SteerOp,
    ZeroOp,
)
from nnterp.dsl.sites import Site
from nnterp.dsl.spec import ModelSpec
from nnterp.dsl.steps import last_step, steer_steps
from nnterp.sites import SiteKind

__all__ = ["lower", "lowers", "uses"]


@attrs.frozen
class _Context:
    """What a lowering rule may use besides its node."""

    spec: ModelSpec
    index: int
    max_tokens: int
    token_id: Callable[[str], int] | None

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def resolve(self, site: Site) -> Site:
        return site.resolve(self.num_layers)

    def layer_site(self, kind: SiteKind, layer: int) -> Site:
        return Site(kind.module, layer % self.num_layers, kind.side)


#: What a rule yields: an operation, or the node's named output.
Lowered = Iterator["Op | Output"]
Rule = Callable[[Node, _Context], Lowered]
#: node type -> its lowering rule
_RULES: dict[type[Node], Rule] = {}


def lowers(node_type: type[Node]) -> Callable[[Rule], Rule]:
    """Register the lowering rule of ``node_type``: a generator of ops and outputs."""

    def register(function: Rule) -> Rule:
        _RULES[node_type] = function
        return function

    return register


@lowers(Read)
def _lower_read(node: Read, ctx: _Context) -> Lowered:
    yield ReadOp(ctx.resolve(node.site), positions=node.positions, steps=node.steps,
                 name=node.output_name, node_index=ctx.index)
    yield Output(node.output_name, OutputKind.READ, node.positions, node.steps)


@lowers(Zero)
def _lower_zero(node: Zero, ctx: _Context) -> Lowered:
    yield ZeroOp(ctx.resolve(node.site), positions=node.positions, node_index=ctx.index)


@lowers(Patch)
def _lower_patch(node: Patch, ctx: _Context) -> Lowered:
    if node.value is None:
        raise ValueError(f"nnterp bug: nodes[{ctx.index}] Patch reached lowering with an "
                         "unresolved source; run() resolves sources first. Please report it")
    yield PatchOp(ctx.resolve(node.site), value=node.value, positions=node.positions,
                  node_index=ctx.index)


@lowers(Steer)
def _lower_steer(node: Steer, ctx: _Context) -> Lowered:
    steps = steer_steps(node.positions)
    yield SteerOp(ctx.layer_site(SiteKind.LAYERS_OUTPUT, node.layer), vector=node.vector,
                  scale=node.scale, positions=node.positions, steps=steps, node_index=ctx.index)


@lowers(Lens)
def _lower_lens(node: Lens, ctx: _Context) -> Lowered:
    layers = node.layer_indices(ctx.num_layers)
    for layer in layers:
        yield LensOp(ctx.layer_site(SiteKind.LAYERS_OUTPUT, layer), layer=layer,
                     positions=node.positions, steps=node.steps, top_k=node.top_k,
                     name=node.name, node_index=ctx.index)
    yield Output(node.name, OutputKind.LENS, node.positions, node.steps, node.top_k, layers)


@lowers(AttentionProbs)
def _lower_attention_probs(node: AttentionProbs, ctx: _Context) -> Lowered:
    # Probabilities are computed inside the layer's attention, before its output.
    yield AttentionProbsOp(ctx.layer_site(SiteKind.ATTENTIONS_OUTPUT, node.layer),
                           name=node.output_name, node_index=ctx.index)
    yield Output(node.output_name, OutputKind.ATTENTION_PROBS)


@lowers(Grad)
def _lower_grad(node: Grad, ctx: _Context) -> Lowered:
    site = ctx.resolve(node.site)
    target = node.target if isinstance(node.target, int) else ctx.token_id(node.target)
    yield GradCaptureOp(site, name=node.output_name, node_index=ctx.index)
    yield GradOp(site, target=target, positions=node.positions, name=node.output_name,
                 node_index=ctx.index)
    yield Output(node.output_name, OutputKind.GRAD, node.positions)


def _order(op: Op, num_layers: int) -> tuple[int, int]:
    # A gradient is taken once the logits exist: after everything else at the logits.
    if isinstance(op, GradOp):
        return (num_layers, 1)
    if isinstance(op, AttentionProbsOp):
        return SiteKind.ATTENTION_PROBABILITIES.order(op.site.layer, num_layers)
    return op.site.order(num_layers)


def lower(graph: Graph, spec: ModelSpec, max_tokens: int = 1,
          token_id: Callable[[str], int] | None = None) -> Plan:
    """Lower a validated graph for ``spec``.

    Args:
        graph: a graph that passed `validate` against ``spec``; `Patch` nodes must hold
            constant values (``run`` resolves sources first).
        spec: the model the plan is for.
        max_tokens: tokens to generate; steps ``1 .. max_tokens - 1`` are the forward
            passes after the prompt's.
        token_id: maps a `Grad`'s string target to a token id (its first token).

    Returns:
        The `Plan`.

    Raises:
        TypeError: a node type without a lowering rule (an nnterp bug: validation
            admits only node types that have one).
    """
    ops: list[Op] = []
    outputs: list[Output] = []
    for index, node in enumerate(graph):
        rule = _RULES.get(type(node))
        if rule is None:
            raise TypeError(f"nnterp bug: no lowering rule for {type(node).__name__}; please report it")
        for item in rule(node, _Context(spec, index, max_tokens, token_id)):
            (outputs if isinstance(item, Output) else ops).append(item)
    # sorted() is stable: operations at one position keep their graph order.
    ordered = tuple(sorted(ops, key=lambda op: _order(op, spec.num_layers)))
    last = max((last_step(op.steps, max_tokens) for op in ordered), default=0)
    return Plan(ops=ordered, num_layers=spec.num_layers, max_step=min(last, max_tokens - 1),
                outputs=tuple(outputs))


def uses(graph: Graph, node_type: type[Node]) -> bool:
    """Whether ``graph`` holds a node of ``node_type``."""
    return any(isinstance(node, node_type) for node in graph)
