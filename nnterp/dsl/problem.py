"""What validation reports, and how its rules are registered.

A rule is a generator ``rule(node, ctx)`` that yields a `Problem` for each thing wrong
with one node; `rule` registers it for node types, and `rules_for` gives a node's rules.
The rules themselves are in `nnterp.dsl.rules`; `nnterp.dsl.validate` runs them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import attrs

from nnterp.dsl.nodes import Node
from nnterp.dsl.spec import ModelSpec

__all__ = ["Problem", "RunFacts", "Context", "rule", "rules_for"]


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
class Context:
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


Rule = Callable[[Any, Context], Iterator[Problem]]
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


def rules_for(node_type: type[Node]) -> list[Rule]:
    # Node-wide rules first, then those of more specific classes.
    out: list[Rule] = []
    for cls in reversed(node_type.__mro__):
        out.extend(_RULES.get(cls, ()))
    return out
