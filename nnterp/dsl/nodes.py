"""The DSL's nodes: immutable descriptions of one intervention or read each.

A node is data. It names a site, positions and arguments, and says nothing about how it
will run: lowering rules registered by the backends turn nodes into nnsight code, and
validation rules check them against a model. Nodes therefore import neither of those.

Every node is a frozen attrs class built through its ``__init__``. One converter per
field (below) normalises what users pass (``"layers[5].output"`` -> `Site`, a list -> a
tuple, a tensor -> a `TensorValue`, ``scale=2`` -> ``2.0``) and checks local facts
(types, signs); ``__attrs_post_init__`` checks rules between fields. Two consequences
follow. Equal arguments give equal, equally hashed nodes, whichever form they were
passed in. And there is no way to hold an ill-formed node: ``attrs.evolve`` and the
JSON loader go through the same converters and ``__init__`` (see `nnterp.dsl.fields`
for how one converter serves both). Facts that depend on a model (layer in range,
vector width, backend support) are checked by ``validate``.

The leading required fields are positional (``Read(site)``, ``Steer(layer, vector)``);
the rest are keyword-only, and keyword names equal the JSON keys. Each class declares
its JSON ``tag``, which enters it in `Node.ops`.

This module never imports nnsight, vllm, transformers, json or the backends.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Union

import attrs

from nnterp.dsl.fields import (
    FieldError,
    Issue,
    code_repr,
    field,
    foreign,
    invalid,
    optional,
    to_int,
    to_ints,
    wrong_type,
    wrong_value,
)
from nnterp.dsl.graph import Node
from nnterp.dsl.sites import Site
from nnterp.dsl.values import TensorValue

__all__ = [
    "Node",
    "Read",
    "Zero",
    "Patch",
    "Source",
    "Steer",
    "Lens",
    "Grad",
    "AttentionProbs",
    "NODE_TYPES",
]

Positions = Union[int, tuple, None]
IntsOrAll = Union[int, tuple, str]

# -- field converters ------------------------------------------------------------------
# One per kind of field, shared by the constructors and the JSON loader (see
# nnterp.dsl.fields). A rule reads after the field's name: "positions[0] must be ...".


def _site(value: Any) -> Site:
    if not isinstance(value, (str, Site)):
        raise wrong_type("must be a string such as 'layers[5].output'", value)
    try:
        return Site.coerce(value)
    except (TypeError, ValueError) as err:
        raise foreign(err) from None


def _layer(value: Any) -> int:
    return to_int(value, rule="must be an integer (a layer index)")


def _position(value: Any) -> int:
    return to_int(value, rule="must be an integer (one token position)")


def _positions(value: Any) -> Positions:
    if value is None:
        return None
    if isinstance(value, (list, tuple, range)):
        return to_ints(value)
    return to_int(value, rule="must be an integer, a list of integers or None (every position)")


def _is_all(value: Any) -> bool:
    # The builtin `all` reads naturally (layers=all); the string is what JSON can hold.
    return value is all or (isinstance(value, str) and value == "all")


def _steps(value: Any) -> IntsOrAll:
    if _is_all(value):
        return "all"
    if isinstance(value, (list, tuple, range)):
        return to_ints(value, minimum=0)
    rule = 'must be 0 (the prompt pass), a generation step, a list of steps or "all"'
    return to_int(value, 0, rule)


def _layers(value: Any) -> IntsOrAll:
    if _is_all(value):
        return "all"
    if isinstance(value, (list, tuple, range)):
        return to_ints(value)
    rule = 'must be "all" (or the builtin all), an integer, a list of integers or a range'
    return to_int(value, rule=rule)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise wrong_type("must be a string", value)
    if not value:
        raise wrong_value("must not be empty", value)
    return value


def _target(value: Any) -> int | str:
    if isinstance(value, str):
        return value
    return to_int(value, 0, "must be a token id (an integer) or a string")


def _top_k(value: Any) -> int | None:
    return None if value is None else to_int(value, 1, "must be a positive integer or None")


def _scale(value: Any) -> float:
    # Plain numbers, numpy scalars and 0-d tensors have __float__; bools and strings
    # are refused rather than read as 1.0 or parsed.
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise wrong_type("must be a number", value)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    except (TypeError, ValueError, RuntimeError):
        raise wrong_type("must be a number", value) from None
    if not math.isfinite(number):
        raise wrong_value("must be finite", value)
    # + 0.0 turns -0.0 into 0.0, so equal nodes also have equal JSON and digests.
    return number + 0.0


def _float_tensor(value: Any) -> TensorValue:
    try:
        tensor = TensorValue.coerce(value)
    except (TypeError, ValueError) as err:
        raise foreign(err) from None
    if not tensor.is_floating_point:
        message = (
            f"activations are floating point, and this tensor is added to or replaces "
            f"them, but its dtype is {tensor.dtype}; pass e.g. tensor.float()"
        )
        raise FieldError.of([Issue(message)])
    return tensor


def _source(value: Any) -> "Source | None":
    if value is None or isinstance(value, Source):
        return value
    raise wrong_type("must be a Source, e.g. Source('the other prompt')", value)


# -- nodes -----------------------------------------------------------------------------


@attrs.frozen(repr=False)
class Read(Node):
    """Save the activation at ``site``.

    Args:
        site: a site string such as ``"layers[5].output"``, or a `Site`.
        positions: token positions to keep: an int (the result has no position axis), a
            list of ints, or None for every position.
        steps: 0 for the prompt pass, a generation step, a list of steps, or ``"all"``.
        name: the result's key; defaults to the site string.

    Example:
        >>> Read("layers[5].output", positions=[0, -1]).output_name
        'layers[5].output'
        >>> Read("logits", name="final")
        Read('logits', name='final')
    """

    tag: ClassVar[str] = "read"
    site: Site = field(_site)
    positions: Positions = field(_positions, default=-1)
    steps: IntsOrAll = field(_steps, default=0)
    name: str | None = field(optional(_text), default=None)

    @property
    def output_name(self) -> str:
        return self.name if self.name is not None else str(self.site)


@attrs.frozen(repr=False)
class Zero(Node):
    """Set the activation at ``site`` to zero (at ``positions``; None means all).

    Example:
        >>> Zero("mlps[3].output", positions=[2, 3])
        Zero('mlps[3].output', positions=(2, 3))
    """

    tag: ClassVar[str] = "zero"
    site: Site = field(_site)
    positions: Positions = field(_positions, default=None)


@attrs.frozen(repr=False)
class Source:
    """Where a `Patch` takes its replacement from: another prompt's activation.

    How its positions meet the `Patch`'s (checked by validation):

    * one position (an int) and the patch's ``positions`` an int or a list: that one
      token's activation is written at each patched position;
    * a list of positions and a list of the same length: token by token, in order (the
      usual activation patching of a span);
    * ``position=None`` and ``positions=None``: every token, one to one (the prompts must
      have the source's length);
    * anything else (one source token written at every position, lists of different
      lengths) is refused, since it has no single meaning.

    Args:
        prompt: the other prompt, run through the same model.
        site: the site to read there; None means the patched site itself.
        position: the token position(s) of ``prompt`` to take: an int, a list, or None
            for every token.

    Example:
        >>> Source("The capital of France is", position=-1)
        Source('The capital of France is')
        >>> Source("The capital of France is", position=[3, 4]).position
        (3, 4)
    """

    prompt: str = field(_text)
    site: Site | None = field(optional(_site), default=None)
    position: Positions = field(_positions, default=-1)

    def __repr__(self) -> str:
        return code_repr(self)


@attrs.frozen(repr=False)
class Patch(Node):
    """Replace the activation at ``site`` with a constant or another prompt's activation.

    Exactly one of ``value`` and ``source`` is given.

    Args:
        site: where to write.
        value: a tensor (or list of numbers) whose last dimension is the site's width
            (hidden size, or vocabulary size for ``logits``); copied on construction.
        source: a `Source` naming another prompt (and optionally another site).
        positions: positions to replace (int, list of ints, or None for all).

    Example:
        >>> import torch
        >>> Patch("layers[2].output", value=torch.zeros(576))
        Patch('layers[2].output', value=TensorValue(float32[576]))
        >>> Patch("layers[2].output", source=Source("Paris is in"), positions=[-1])
        Patch('layers[2].output', source=Source('Paris is in'), positions=(-1,))
    """

    tag: ClassVar[str] = "patch"
    site: Site = field(_site)
    value: TensorValue | None = field(
        optional(_float_tensor), default=None, json_object=TensorValue
    )
    source: Source | None = field(_source, default=None, json_object=Source)
    positions: Positions = field(_positions, default=-1)

    def __attrs_post_init__(self) -> None:
        if (self.value is None) == (self.source is None):
            given = "both" if self.value is not None else "neither"
            raise invalid(
                self,
                ["value", "source"],
                f"pass exactly one of value (a tensor) and source (a Source), got {given}",
            )
        if self.value is not None and self.value.ndim == 0:
            raise invalid(
                self,
                ["value"],
                "value is 0-d, but its last dimension must be the site's width; pass a "
                "vector (or [positions, width] tensor)",
            )


@attrs.frozen(repr=False)
class Steer(Node):
    """Add ``scale * vector`` to ``layers_output[layer]``.

    With ``positions=None`` it applies at every prompt position and at every generated
    token. ``scale`` is stored as a float so that ``scale=2`` and ``scale=2.0`` give the
    same, equal and equally hashed node (and the same JSON).

    Args:
        layer: the layer index (negative counts from the end).
        vector: a 1-D floating-point tensor (or list of numbers) of hidden size.
        scale: a finite number.
        positions: positions to steer, or None for all (including generated tokens).

    Example:
        >>> import torch
        >>> v = torch.ones(576)
        >>> node = Steer(10, v, scale=4)
        >>> node
        Steer(10, TensorValue(float32[576]), scale=4.0)
        >>> v.mul_(0)[:1]  # changing the caller's tensor leaves the node unchanged
        tensor([0.])
        >>> float(node.vector.to_tensor().sum())
        576.0
    """

    tag: ClassVar[str] = "steer"
    layer: int = field(_layer)
    vector: TensorValue = field(_float_tensor, json_object=TensorValue)
    scale: float = field(_scale, default=1.0)
    positions: Positions = field(_positions, default=None)

    def __attrs_post_init__(self) -> None:
        if self.vector.ndim != 1:
            raise invalid(
                self,
                ["vector"],
                f"vector must be 1-D (hidden size), got shape {list(self.vector.shape)}; "
                "pass e.g. vector.reshape(-1) or one row",
            )


@attrs.frozen(repr=False)
class Lens(Node):
    """Logit lens: final norm + unembedding of each chosen layer's output, as probabilities.

    Args:
        layers: the builtin ``all`` or ``"all"`` (stored as ``"all"``), an int, or a
            list/tuple/range of ints (stored as a tuple).
        positions: positions to project (int, list, or None for all).
        steps: as for `Read`.
        top_k: keep only the ``top_k`` most likely tokens (returns probabilities and ids).
        name: the result's key.

    Example:
        >>> Lens()
        Lens()
        >>> Lens(layers=range(0, 6, 2), top_k=5)
        Lens(layers=(0, 2, 4), top_k=5)
        >>> Lens(layers=all) == Lens(layers="all")
        True
    """

    tag: ClassVar[str] = "lens"
    layers: IntsOrAll = field(_layers, default="all")
    positions: Positions = field(_positions, default=-1)
    steps: IntsOrAll = field(_steps, default=0)
    top_k: int | None = field(_top_k, default=None)
    name: str = field(_text, default="lens")

    @property
    def output_name(self) -> str:
        return self.name

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The layers read, from 0, in the order the result stacks them.

        Example:
            >>> Lens(layers=[0, -1]).layer_indices(30)
            (0, 29)
        """
        if self.layers == "all":
            return tuple(range(num_layers))
        chosen = (self.layers,) if isinstance(self.layers, int) else self.layers
        return tuple(layer % num_layers for layer in chosen)


@attrs.frozen(repr=False)
class Grad(Node):
    """Gradient of log p(``target``) at the last position with respect to ``site`` (HF only).

    Args:
        site: the activation to differentiate with respect to.
        target: a token id, or a string (its first token is used by the lowering).
        positions: positions of ``site`` whose gradient is returned.
        name: the result's key; defaults to ``"grad:<site>"``.

    Example:
        >>> Grad("layers[3].output", " Paris").output_name
        'grad:layers[3].output'
    """

    tag: ClassVar[str] = "grad"
    site: Site = field(_site)
    target: int | str = field(_target)
    positions: Positions = field(_positions, default=-1)
    name: str | None = field(optional(_text), default=None)

    @property
    def output_name(self) -> str:
        return self.name if self.name is not None else f"grad:{self.site}"


@attrs.frozen(repr=False)
class AttentionProbs(Node):
    """Attention probabilities of one layer (HF only, needs ``enable_attention_probs``).

    Example:
        >>> AttentionProbs(-1).output_name
        'attention_probs[-1]'
    """

    tag: ClassVar[str] = "attention_probs"
    layer: int = field(_layer)
    name: str | None = field(optional(_text), default=None)

    @property
    def output_name(self) -> str:
        return self.name if self.name is not None else f"attention_probs[{self.layer}]"


#: Every concrete node type, in the order the docs present them.
NODE_TYPES: tuple[type[Node], ...] = (Read, Zero, Patch, Steer, Lens, Grad, AttentionProbs)
