"""`Graph`: an ordered, immutable sequence of nodes, built with ``>>`` or ``Graph([...])``.

A graph is a flat tuple. ``>>`` concatenates (a node counts as a one-node graph), so it
is associative and ``(a >> b) >> c == a >> (b >> c) == Graph([a, b, c])``; nesting
graphs never creates structure. Order matters only where nodes share a site: there they
act in graph order. Across sites, data flows in model order whatever the graph order
(see SPEC.md, "Semantics").

Serialization lives in `nnterp.dsl.serialize`; the methods here (`to_json`,
`from_json`, `digest`) import it when called, so this module never imports json.
This module never imports nnsight, vllm, transformers, json or the backends.
"""

from __future__ import annotations

from typing import Any, Iterator, NoReturn, overload

import attrs

from nnterp.dsl.nodes import Node

__all__ = ["Graph", "as_graph"]


def _flatten(nodes: Any) -> tuple[Node, ...]:
    if isinstance(nodes, Node):
        return (nodes,)
    if isinstance(nodes, Graph):
        return nodes.nodes
    if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
        raise TypeError(
            f"Graph(nodes) takes a list of nodes, got {type(nodes).__name__}; "
            "write Graph([Read('layers[0].output'), Lens()])"
        )
    out: list[Node] = []
    for i, item in enumerate(nodes):
        if isinstance(item, Graph):
            out.extend(item.nodes)
        elif isinstance(item, Node):
            out.append(item)
        else:
            raise TypeError(
                f"Graph(nodes): nodes[{i}] is of type {type(item).__name__}, not a node "
                "(Read, Zero, Patch, Steer, Lens, Grad, AttentionProbs)"
            )
    return tuple(out)


@attrs.frozen(repr=False)
class Graph:
    """An ordered sequence of nodes that run on the same forward pass (and generation).

    Args:
        nodes: nodes (or graphs, which are spliced in) in order; a single node is
            accepted too.

    Raises:
        TypeError: an element is not a node.

    Example:
        >>> from nnterp.dsl import Read, Steer, Lens
        >>> g = Steer(3, [0.5] * 8, scale=2) >> Read("layers[3].output") >> Lens(top_k=3)
        >>> len(g), g[0].layer
        (3, 3)
        >>> print(g)
        [0] Steer(3, TensorValue(float32[8]), scale=2.0)
        [1] Read('layers[3].output')
        [2] Lens(top_k=3)
        >>> Graph.from_json(g.to_json()) == g
        True
    """

    nodes: tuple[Node, ...] = attrs.field(converter=_flatten)

    @staticmethod
    def _refuse(other: Any, side: str) -> NoReturn:
        hint = (
            "; a list on the left of >> is not composed: "
            if isinstance(other, (list, tuple))
            else "; "
        )
        raise TypeError(
            f"cannot compose a value of type {type(other).__name__} with >> (on the {side}): "
            f"only nodes and graphs compose{hint}wrap several nodes with Graph([...])"
        )

    def __rshift__(self, other: Any) -> "Graph":
        if isinstance(other, Graph):
            return Graph(self.nodes + other.nodes)
        if isinstance(other, Node):
            return Graph(self.nodes + (other,))
        self._refuse(other, "right")

    def __rrshift__(self, other: Any) -> "Graph":
        # Reached only when the left operand is neither a node nor a graph.
        self._refuse(other, "left")

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @overload
    def __getitem__(self, index: int) -> Node: ...

    @overload
    def __getitem__(self, index: slice) -> "Graph": ...

    def __getitem__(self, index: Any) -> Any:
        """A node by index, or a sub-graph for a slice."""
        if isinstance(index, slice):
            return Graph(self.nodes[index])
        return self.nodes[index]

    @property
    def output_names(self) -> tuple[str, ...]:
        """The output names of the nodes that have one, in graph order."""
        return tuple(n.output_name for n in self.nodes if n.output_name is not None)

    def __str__(self) -> str:
        # One indexed node per line: the lines validation and errors quote.
        return "\n".join(f"[{i}] {node!r}" for i, node in enumerate(self.nodes))

    def __repr__(self) -> str:
        return f"Graph([{', '.join(repr(n) for n in self.nodes)}])"

    def to_json(self) -> str:
        """The canonical JSON text of this graph (see `nnterp.dsl.serialize`)."""
        from nnterp.dsl import serialize

        return serialize.to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Graph":
        """Read a graph from JSON text; raises `GraphFormatError` for anything else."""
        from nnterp.dsl import serialize

        return serialize.from_json(text)

    def digest(self) -> str:
        """The sha256 hex digest of the canonical JSON: equal graphs, equal digests."""
        from nnterp.dsl import serialize

        return serialize.digest(self)


def as_graph(value: Any) -> Graph:
    """A node or graph as a graph (for functions that accept either)."""
    if isinstance(value, Graph):
        return value
    if isinstance(value, Node):
        return Graph([value])
    raise TypeError(
        f"expected a Graph or a node, got {type(value).__name__}; "
        "wrap several nodes with Graph([...])"
    )

