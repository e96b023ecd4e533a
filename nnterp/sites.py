"""The site vocabulary: every kind of standardized activation, defined once.

A *site kind* is one of the places nnterp can read or write in a forward pass: the
embeddings' output, a layer's input or output, what a layer's attention or MLP adds to
the residual stream, a layer's attention probabilities, the logits. Everything that
names sites uses this table: the accessors of `StandardizedTransformer`
(``layers_output[i]`` is `SiteKind.LAYERS_OUTPUT`), the DSL's site strings
(``"layers[5].output"``), the order in which lowering places operations in the forward
pass, the backends' read and write rules, and activation collection.

What each kind is, is data on the member: the DSL module and side its site string
spells, whether it takes a layer index, where it runs within a layer, and what its last
dimension counts. No other module keeps its own list of kinds.

This is the lowest layer of nnterp: it imports nothing from nnterp and nothing heavy.
"""

from __future__ import annotations

import enum

__all__ = ["SiteKind"]


class SiteKind(enum.Enum):
    """A kind of standardized activation; the value is its accessor name.

    Example:
        >>> SiteKind.LAYERS_OUTPUT.site(5)
        'layers[5].output'
        >>> SiteKind.for_site("mlps", "output")
        <SiteKind.MLPS_OUTPUT: 'mlps_output'>
        >>> [kind.value for kind in SiteKind if kind.in_dsl and kind.per_layer]
        ['layers_input', 'attentions_output', 'mlps_output', 'layers_output']
        >>> SiteKind.LOGITS.order(layer=None, num_layers=30) > SiteKind.LAYERS_OUTPUT.order(29, 30)
        True
    """

    # Declared in execution order: the order of the members is the order in which a
    # forward pass reaches them (within one layer, for the per-layer kinds).
    EMBEDDINGS_OUTPUT = "embeddings_output"
    LAYERS_INPUT = "layers_input"
    ATTENTION_PROBABILITIES = "attention_probabilities"
    ATTENTIONS_OUTPUT = "attentions_output"
    MLPS_OUTPUT = "mlps_output"
    LAYERS_OUTPUT = "layers_output"
    LOGITS = "logits"

    @property
    def module(self) -> str:
        """The module part of the DSL site string (``"layers"``, ``"logits"``...)."""
        return _FACTS[self][0]

    @property
    def side(self) -> str | None:
        """``"input"``, ``"output"``, or None for ``logits`` and attention probabilities."""
        return _FACTS[self][1]

    @property
    def per_layer(self) -> bool:
        """Whether the kind takes a layer index (every kind but embeddings and logits)."""
        return self not in (SiteKind.EMBEDDINGS_OUTPUT, SiteKind.LOGITS)

    @property
    def in_dsl(self) -> bool:
        """Whether a DSL site string names it. Attention probabilities are reached by the
        `AttentionProbs` node instead: they are not a stream that other nodes edit."""
        return self is not SiteKind.ATTENTION_PROBABILITIES

    @property
    def width(self) -> str | None:
        """What the last dimension counts: ``"hidden_size"``, ``"vocab_size"`` (logits),
        or None (attention probabilities, whose last dimension is the sequence)."""
        return _FACTS[self][2]

    def site(self, layer: int | None = None) -> str:
        """The DSL site string of this kind at ``layer`` (``"layers[3].output"``)."""
        if not self.in_dsl:
            raise ValueError(f"{self.value} has no DSL site string; use the AttentionProbs node")
        if self.per_layer:
            return f"{self.module}[{layer}].{self.side}"
        return self.module if self.side is None else f"{self.module}.{self.side}"

    def order(self, layer: int | None, num_layers: int) -> tuple[int, int]:
        """Sort key of this kind at ``layer`` in one forward pass: (layer, rank in layer).

        Embeddings come before layer 0 and logits after the last layer.
        """
        if self is SiteKind.EMBEDDINGS_OUTPUT:
            return (-1, 0)
        if self is SiteKind.LOGITS:
            return (num_layers, 0)
        return (layer, _RANK[self])

    @classmethod
    def for_site(cls, module: str, side: str | None) -> "SiteKind | None":
        """The DSL kind a site string's module and side name, or None if none does."""
        return _BY_SITE.get((module, side))


#: kind -> (DSL module, side, width)
_FACTS: dict[SiteKind, tuple[str, str | None, str | None]] = {
    SiteKind.EMBEDDINGS_OUTPUT: ("embeddings", "output", "hidden_size"),
    SiteKind.LAYERS_INPUT: ("layers", "input", "hidden_size"),
    SiteKind.ATTENTION_PROBABILITIES: ("attention_probabilities", None, None),
    SiteKind.ATTENTIONS_OUTPUT: ("attentions", "output", "hidden_size"),
    SiteKind.MLPS_OUTPUT: ("mlps", "output", "hidden_size"),
    SiteKind.LAYERS_OUTPUT: ("layers", "output", "hidden_size"),
    SiteKind.LOGITS: ("logits", None, "vocab_size"),
}
_RANK = {kind: rank for rank, kind in enumerate(SiteKind)}
_BY_SITE = {(kind.module, kind.side): kind for kind in SiteKind if kind.in_dsl}
