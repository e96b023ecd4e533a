"""Lowering: a validated graph becomes a `Plan`, an ordered program of site operations.

A graph says *what* to do; the plan says *in which order*, which is the one thing
nnsight needs decided up front: it serves activations in model order, so every
operation is placed at its site's position in the forward pass, and operations at the
same site keep their graph order. Each node lowers to one or more `Op`s:

* `Read`, `Zero`, `Patch` (constant value), `Steer` act at their site;
* `Lens` becomes one read of ``layers[l].output`` per chosen layer, projected on the
  vocabulary where it is read;
* `AttentionProbs` reads inside the attention of its layer;
* `Grad` captures its site's activation, and takes the gradient once the logits exist.

`Patch(source=...)` is not lowered here: ``run`` first runs the source prompts and
turns such patches into constant-value patches.

The plan is backend-independent data. Backends register an *executor* with
`register_executor` when they are imported (the ``nnterp.backends`` modules do), and
``run`` hands the plan to the executor of the model's backend; this module never
imports a backend. Every op keeps the index of the node it came from, for messages.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from nnterp.dsl.graph import Graph
from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Node, Patch, Read, Steer, Zero
from nnterp.dsl.sites import Site
from nnterp.dsl.spec import ModelSpec
from nnterp.dsl.values import TensorValue

__all__ = ["Op", "Plan", "lower", "register_executor", "executor_for", "site_order"]

#: backend name -> executor(plan, model, prompts, sampling) -> raw results
_EXECUTORS: dict[str, Callable[..., Any]] = {}

# Where each kind of site sits inside one layer, in execution order.
_WITHIN_LAYER = {("layers", "input"): 0, ("attention_probs", None): 1, ("attentions", "output"): 2,
                 ("mlps", "output"): 3, ("layers", "output"): 4}


def site_order(site: Site | None, num_layers: int, attention_probs_layer: int | None = None) -> tuple[int, int]:
    """Sort key of a site in one forward pass: (layer, position within the layer)."""
    if attention_probs_layer is not None:
        return (attention_probs_layer, _WITHIN_LAYER[("attention_probs", None)])
    if site.module == "embeddings":
        return (-1, 0)
    if site.module == "logits":
        return (num_layers, 0)
    return (site.layer, _WITHIN_LAYER[(site.module, site.side)])


@attrs.frozen
class Op:
    """One operation at one site, in the forward pass of each prompt.

    Attributes:
        action: ``"read"``, ``"zero"``, ``"patch"``, ``"steer"``, ``"lens"``,
            ``"attention_probs"``, ``"grad_capture"`` or ``"grad"``.
        site: the (resolved) site acted on; ``None`` for attention probabilities.
        layer: the layer, for ``lens`` and ``attention_probs``.
        positions: an int, a tuple of ints, or ``None`` (all of the prompt's tokens).
        steps: which forward passes it acts in: an int, a tuple, or ``"all"``.
        value: the constant of a patch or the vector of a steer.
        scale: a steer's scale.
        name: the output name results are stored under.
        top_k: a lens's top-k, or ``None`` for full distributions.
        target: a gradient's target token id.
        node_index: the graph node this op came from.
    """

    action: str
    site: Site | None
    node_index: int
    layer: int | None = None
    positions: Any = -1
    steps: Any = 0
    value: TensorValue | None = None
    scale: float = 1.0
    name: str | None = None
    top_k: int | None = None
    target: int | None = None

    def active(self, step: int) -> bool:
        """Whether this op acts in the forward pass of generation step ``step``."""
        if self.steps == "all":
            return True
        if isinstance(self.steps, tuple):
            return step in self.steps
        return step == self.steps


@attrs.frozen
class Plan:
    """The lowered graph: ops in execution order, and the facts executors need.

    Attributes:
        ops: every op, sorted by site order, graph order kept within a site.
        backend: the backend the plan was lowered for.
        num_layers: the model's layer count (for ordering and `Lens` outputs).
        max_step: the last generation step any op needs (0: the prompt pass only).
        needs_grad: whether a `Grad` is present (HF runs the forward with autograd).
        outputs: output name -> ``"read"``, ``"lens"``, ``"attention_probs"`` or ``"grad"``.
        lens_layers: lens name -> the layers it reads, in order.
    """

    ops: tuple[Op, ...]
    backend: str
    num_layers: int
    max_step: int
    needs_grad: bool
    outputs: tuple[tuple[str, str], ...]
    lens_layers: tuple[tuple[str, tuple[int, ...]], ...]

    def ops_at(self, step: int) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.active(step))


def register_executor(backend: str, executor: Callable[..., Any]) -> None:
    """Register how ``backend`` runs a `Plan`; called by each backend module on import."""
    _EXECUTORS[backend] = executor


def executor_for(backend: str) -> Callable[..., Any]:
    if backend not in _EXECUTORS:
        # The backends register themselves on import; import them lazily from here
        # rather than at module level, so the DSL never depends on them statically.
        import importlib

        importlib.import_module(f"nnterp.backends.{backend}")
    try:
        return _EXECUTORS[backend]
    except KeyError:
        raise RuntimeError(
            f"nnterp bug: no executor registered for backend {backend!r} "
            f"(known: {', '.join(sorted(_EXECUTORS)) or 'none'}); please report it"
        ) from None


def _max_step(steps: Any, max_tokens: int) -> int:
    if steps == "all":
        return max_tokens - 1
    if isinstance(steps, tuple):
        return max(steps)
    return steps


def lower(graph: Graph, spec: ModelSpec, max_tokens: int = 1, token_ids: Callable[[str], int] | None = None) -> Plan:
    """Lower a validated graph for ``spec``'s backend.

    Args:
        graph: a graph that passed `validate` against ``spec``; `Patch` nodes must hold
            constant values (``run`` resolves sources first).
        spec: the model the plan is for.
        max_tokens: tokens to generate; steps ``1 .. max_tokens - 1`` are the forward
            passes after the prompt's.
        token_ids: maps a `Grad`'s string target to a token id (its first token).

    Returns:
        The `Plan`.
    """
    n = spec.num_layers
    keyed: list[tuple[tuple[int, int], int, Op]] = []
    outputs: list[tuple[str, str]] = []
    lens_layers: list[tuple[str, tuple[int, ...]]] = []
    max_step = 0
    sequence = 0

    def add(order: tuple[int, int], op: Op) -> None:
        nonlocal sequence
        keyed.append((order, sequence, op))
        sequence += 1

    for index, node in enumerate(graph):
        if isinstance(node, Read):
            site = node.site.resolve(n)
            add(site_order(site, n), Op("read", site, index, positions=node.positions, steps=node.steps,
                                        name=node.output_name))
            outputs.append((node.output_name, "read"))
            max_step = max(max_step, _max_step(node.steps, max_tokens))
        elif isinstance(node, Zero):
            site = node.site.resolve(n)
            add(site_order(site, n), Op("zero", site, index, positions=node.positions))
        elif isinstance(node, Patch):
            if node.value is None:
                raise ValueError(f"nodes[{index}] Patch: its source must be resolved before lowering")
            site = node.site.resolve(n)
            add(site_order(site, n), Op("patch", site, index, positions=node.positions, value=node.value))
        elif isinstance(node, Steer):
            site = Site("layers", node.layer % n, "output")
            # positions=None steers every token, generated ones included
            steps = "all" if node.positions is None else 0
            max_step = max(max_step, _max_step(steps, max_tokens))
            add(site_order(site, n), Op("steer", site, index, positions=node.positions, steps=steps,
                                        value=node.vector, scale=node.scale))
        elif isinstance(node, Lens):
            layers = tuple(range(n)) if node.layers == "all" else (
                (node.layers,) if isinstance(node.layers, int) else tuple(node.layers))
            layers = tuple(layer % n for layer in layers)
            for layer in layers:
                site = Site("layers", layer, "output")
                add(site_order(site, n), Op("lens", site, index, layer=layer, positions=node.positions,
                                            steps=node.steps, name=node.name, top_k=node.top_k))
            outputs.append((node.name, "lens"))
            lens_layers.append((node.name, layers))
            max_step = max(max_step, _max_step(node.steps, max_tokens))
        elif isinstance(node, AttentionProbs):
            layer = node.layer % n
            add(site_order(None, n, attention_probs_layer=layer),
                Op("attention_probs", None, index, layer=layer, name=node.output_name))
            outputs.append((node.output_name, "attention_probs"))
        elif isinstance(node, Grad):
            site = node.site.resolve(n)
            target = node.target if isinstance(node.target, int) else token_ids(node.target)
            add(site_order(site, n), Op("grad_capture", site, index, positions=node.positions,
                                        name=node.output_name))
            add((n, 1), Op("grad", site, index, positions=node.positions, name=node.output_name, target=target))
            outputs.append((node.output_name, "grad"))
        else:  # validation admits only the node types above
            raise TypeError(f"nnterp bug: no lowering for {type(node).__name__}; please report it")

    ordered = tuple(op for _, _, op in sorted(keyed, key=lambda item: (item[0], item[1])))
    return Plan(ops=ordered, backend=spec.backend, num_layers=n, max_step=min(max_step, max_tokens - 1),
                needs_grad=any(op.action == "grad" for op in ordered), outputs=tuple(outputs),
                lens_layers=tuple(lens_layers))


def uses(graph: Graph, node_type: type[Node]) -> bool:
    return any(isinstance(node, node_type) for node in graph)
