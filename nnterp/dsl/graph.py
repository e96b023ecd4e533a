"""`Node`, the base of every DSL node, and `Graph`, an immutable sequence of nodes.

A graph is a flat tuple. ``>>`` concatenates (a node counts as a one-node graph), so it
is associative and ``(a >> b) >> c == a >> (b >> c) == Graph([a, b, c])``; nesting
graphs never creates structure. Order matters only where nodes share a site: there they
act in graph order. Across sites, data flows in model order whatever the graph order
(see SPEC.md, "Semantics").

`Node` lives here, next to `Graph`, because ``a >> b`` builds a graph: the concrete
nodes (`nnterp.dsl.nodes`) import this module and nothing here imports them back. Each
concrete class declares its JSON ``"op"`` as ``tag``; defining the class enters it in
`Node.ops`, the table the JSON codec (`nnterp.dsl.codec`) writes and reads nodes by.
The package ``nnterp.dsl`` imports `nnterp.dsl.nodes`, so the table is complete before
any graph can be read.

This module never imports json (the codec does), nnsight, vllm, transformers or the
backends.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any, ClassVar, Iterator, Mapping, NoReturn, overload

import attrs

from nnterp.dsl.codec import decode, encode
from nnterp.dsl.fields import code_repr

__all__ = ["Node", "Graph", "as_graph"]

_OPS: dict[str, type["Node"]] = {}


@attrs.frozen(repr=False)
class Node:
    """Base of every DSL node: a frozen value that composes with ``>>``.

    ``a >> b`` is ``Graph([a, b])``. Subclasses set `output_name` when they produce a
    named result, and built-in ones declare their JSON ``tag``.

    Example:
        >>> from nnterp.dsl import Lens, Read
        >>> Read("logits") >> Lens()
        Graph([Read('logits'), Lens()])
        >>> Node.ops["lens"] is Lens, Lens.tag
        (True, 'lens')
    """

    #: The class's JSON ``"op"`` (its snake_case name). Only a class that declares its
    #: own has a JSON form: a subclass without one (a user's node) does not serialize.
    tag: ClassVar[str | None] = None
    #: tag -> node class, in the order the classes were defined.
    ops: ClassVar[Mapping[str, type["Node"]]] = MappingProxyType(_OPS)

    @classmethod
    def __attrs_init_subclass__(cls) -> None:
        # Called with the final class: attrs re-creates slotted classes after the body.
        tag = cls.__dict__.get("tag")
        if tag is None:
            return
        if tag in _OPS:
            raise TypeError(
                f"{cls.__name__}.tag {tag!r} is already the tag of {_OPS[tag].__name__}; "
                "each node class needs its own"
            )
        _OPS[tag] = cls

    @property
    def output_name(self) -> str | None:
        """The key of this node's result in ``run(...)[key]``, or None if it has none."""
        return None

    def __rshift__(self, other: Any) -> "Graph":
        return Graph([self]) >> other

    def __rrshift__(self, other: Any) -> NoReturn:
        # Reached only when the left operand is neither a node nor a graph.
        Graph._refuse(other, "left")

    def __repr__(self) -> str:
        return code_repr(self)


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
        """The canonical JSON text of this graph (see `nnterp.dsl.serialize`).

        Raises:
            TypeError: a node's class has no JSON ``tag``.
        """
        return encode(self.nodes, Node.ops)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Graph":
        """Read a graph from JSON text; raises `GraphFormatError` for anything else."""
        return cls(decode(text, Node.ops))

    def digest(self) -> str:
        """The sha256 hex digest of the canonical JSON: equal graphs, equal digests."""
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()


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

