"""The DSL's nodes: immutable descriptions of one intervention or read each.

A node is data. It names a site, positions and arguments, and says nothing about how it
will run: lowering rules registered by the backends turn nodes into nnsight code, and
validation rules check them against a model. Nodes therefore import neither of those.

Every node is a frozen attrs class built through its ``__init__``: converters normalise
what users pass (``"layers[5].output"`` -> `Site`, a list -> a tuple, a tensor -> a
`TensorValue`, ``scale=2`` -> ``2.0``), then validators check local facts (types, signs,
tensor rank). Two consequences follow. Equal arguments give equal, equally hashed nodes,
whichever form they were passed in. And there is no way to hold an ill-formed node: JSON
loading and ``attrs.evolve`` go through the same ``__init__``. Facts that depend on a
model (layer in range, vector width, backend support) are checked by ``validate``.

The leading required fields are positional (``Read(site)``, ``Steer(layer, vector)``);
the rest are keyword-only, and keyword names equal the JSON keys.

This module never imports nnsight, vllm, transformers, json or the backends.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Union

import attrs

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


# -- conversion helpers ----------------------------------------------------------------
# Each converter receives the half-built instance and the field, so its error can name
# both: "Steer(vector=...): ...". They raise TypeError for a wrong type and ValueError
# for a right type with a wrong value, like attrs' own validators.


def _where(self: Any, field: attrs.Attribute) -> str:
    return f"{type(self).__name__}({field.name}=...)"


def _show(value: Any) -> str:
    """A short description of a received value for error messages (never a tensor dump)."""
    text = repr(value) if not isinstance(value, (list, tuple)) or len(value) < 8 else (
        f"{type(value).__name__} of {len(value)} items"
    )
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _as_int(value: Any) -> int:
    """``value`` as an int, accepting integer-like scalars (numpy, 0-d tensors) but
    never bools or floats: ``True`` as a layer index or ``2.0`` as a position is a bug
    in the caller, not a request."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError
    return operator.index(value)


def _int_tuple(value: Any, where: str, what: str, minimum: int | None = None) -> tuple[int, ...]:
    items = tuple(value)
    if not items:
        raise ValueError(f"{where}: {what} is empty; pass at least one index")
    out = []
    for i, item in enumerate(items):
        try:
            number = _as_int(item)
        except TypeError:
            raise TypeError(f"{where}: {what}[{i}] must be an int, got {_show(item)}") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"{where}: {what}[{i}] must be >= {minimum}, got {number}")
        out.append(number)
    return tuple(out)


def _site(value: Any, self: Any, field: attrs.Attribute) -> Site:
    try:
        return Site.coerce(value)
    except TypeError as err:
        raise TypeError(f"{_where(self, field)}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{_where(self, field)}: {err}") from err


def _optional_site(value: Any, self: Any, field: attrs.Attribute) -> Site | None:
    return None if value is None else _site(value, self, field)


def _layer(value: Any, self: Any, field: attrs.Attribute) -> int:
    try:
        return _as_int(value)
    except TypeError:
        raise TypeError(
            f"{_where(self, field)}: {field.name} must be an int layer index "
            f"(negative counts from the end), got {_show(value)}"
        ) from None


def _positions(value: Any, self: Any, field: attrs.Attribute) -> Positions:
    where = _where(self, field)
    if value is None:
        return None
    if isinstance(value, (list, tuple, range)):
        return _int_tuple(value, where, field.name)
    try:
        return _as_int(value)
    except TypeError:
        raise TypeError(
            f"{where}: {field.name} must be an int, a list of ints or None (every "
            f"position), got {_show(value)}"
        ) from None


def _position(value: Any, self: Any, field: attrs.Attribute) -> int:
    try:
        return _as_int(value)
    except TypeError:
        raise TypeError(
            f"{_where(self, field)}: {field.name} must be one int position "
            f"(negative counts from the end), got {_show(value)}"
        ) from None


def _is_all(value: Any) -> bool:
    # The builtin `all` reads naturally (layers=all); the string is what JSON can hold.
    return value is all or (isinstance(value, str) and value == "all")


def _steps(value: Any, self: Any, field: attrs.Attribute) -> int | tuple[int, ...] | str:
    where = _where(self, field)
    if _is_all(value):
        return "all"
    if isinstance(value, (list, tuple, range)):
        return _int_tuple(value, where, field.name, minimum=0)
    try:
        number = _as_int(value)
    except TypeError:
        raise TypeError(
            f"{where}: steps must be 0 (the prompt pass), a generation step, a list of "
            f"steps or 'all', got {_show(value)}"
        ) from None
    if number < 0:
        raise ValueError(f"{where}: steps must be >= 0 (0 is the prompt pass), got {number}")
    return number


def _layers(value: Any, self: Any, field: attrs.Attribute) -> int | tuple[int, ...] | str:
    where = _where(self, field)
    if _is_all(value):
        return "all"
    if isinstance(value, (list, tuple, range)):
        return _int_tuple(value, where, field.name)
    try:
        return _as_int(value)
    except TypeError:
        raise TypeError(
            f"{where}: layers must be all (or 'all'), an int, a list of ints or a range, "
            f"got {_show(value)}"
        ) from None


def _name(value: Any, self: Any, field: attrs.Attribute) -> str | None:
    if value is None and field.default is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{_where(self, field)}: name must be a str, got {_show(value)}")
    if not value:
        raise ValueError(f"{_where(self, field)}: name must not be empty")
    return value


def _tensor(value: Any, self: Any, field: attrs.Attribute) -> TensorValue | None:
    if value is None and field.default is None:
        return None
    where = _where(self, field)
    try:
        tensor = TensorValue.coerce(value)
    except TypeError as err:
        raise TypeError(f"{where}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if not tensor.is_floating_point:
        raise TypeError(
            f"{where}: {field.name} has dtype {tensor.dtype}, but it is added to or "
            "replaces activations, which are floating point; pass e.g. tensor.float()"
        )
    return tensor


def _scale(value: Any, self: Any, field: attrs.Attribute) -> float:
    where = _where(self, field)
    # Plain numbers, numpy scalars and 0-d tensors have __float__; bools and strings
    # are refused rather than read as 1.0 or parsed.
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{where}: scale must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{where}: scale {value} is too large for a float") from None
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: scale must be a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: scale must be finite, got {number}")
    # + 0.0 turns -0.0 into 0.0, so equal nodes also have equal JSON and digests.
    return number + 0.0


def _top_k(value: Any, self: Any, field: attrs.Attribute) -> int | None:
    if value is None:
        return None
    try:
        number = _as_int(value)
    except TypeError:
        raise TypeError(
            f"{_where(self, field)}: top_k must be a positive int or None, got {_show(value)}"
        ) from None
    if number < 1:
        raise ValueError(f"{_where(self, field)}: top_k must be >= 1, got {number}")
    return number


def _target(value: Any, self: Any, field: attrs.Attribute) -> int | str:
    if isinstance(value, str):
        return value
    try:
        number = _as_int(value)
    except TypeError:
        raise TypeError(
            f"{_where(self, field)}: target must be a token id (int) or a string, "
            f"got {_show(value)}"
        ) from None
    if number < 0:
        raise ValueError(f"{_where(self, field)}: target token id must be >= 0, got {number}")
    return number


def _prompt(value: Any, self: Any, field: attrs.Attribute) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{_where(self, field)}: prompt must be a str, got {_show(value)}")
    if not value:
        raise ValueError(f"{_where(self, field)}: prompt must not be empty")
    return value


def _source(value: Any, self: Any, field: attrs.Attribute) -> "Source | None":
    if value is None or isinstance(value, Source):
        return value
    raise TypeError(
        f"{_where(self, field)}: source must be a Source, got {_show(value)}; "
        "write source=Source('the other prompt')"
    )


def _converter(function: Any) -> attrs.Converter:
    return attrs.Converter(function, takes_self=True, takes_field=True)


def _code_repr(obj: Any) -> str:
    """``ClassName(positional, keyword=value)``, showing keywords only when they differ
    from their default, so the repr reads like the shortest code that builds ``obj``."""
    parts = []
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        shown = repr(str(value)) if isinstance(value, Site) else repr(value)
        if not field.kw_only:
            parts.append(shown)
        elif value != field.default:
            parts.append(f"{field.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


# -- nodes -----------------------------------------------------------------------------


@attrs.frozen(repr=False)
class Node:
    """Base of every DSL node: a frozen value that composes with ``>>``.

    ``a >> b`` is ``Graph([a, b])``; see `nnterp.dsl.Graph`. Subclasses set
    `output_name` when they produce a named result.
    """

    @property
    def output_name(self) -> str | None:
        """The key of this node's result in ``run(...)[key]``, or None if it has none."""
        return None

    def __rshift__(self, other: Any) -> Any:
        from nnterp.dsl.graph import Graph

        return Graph([self]) >> other

    def __rrshift__(self, other: Any) -> Any:
        from nnterp.dsl.graph import Graph

        return Graph._refuse(other, "left")

    def __repr__(self) -> str:
        return _code_repr(self)


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

    site: Site = attrs.field(converter=_converter(_site))
    positions: Positions = attrs.field(default=-1, kw_only=True, converter=_converter(_positions))
    steps: int | tuple[int, ...] | str = attrs.field(
        default=0, kw_only=True, converter=_converter(_steps)
    )
    name: str | None = attrs.field(default=None, kw_only=True, converter=_converter(_name))

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

    site: Site = attrs.field(converter=_converter(_site))
    positions: Positions = attrs.field(default=None, kw_only=True, converter=_converter(_positions))


@attrs.frozen(repr=False)
class Source:
    """Where a `Patch` takes its replacement from: another prompt's activation.

    Args:
        prompt: the other prompt, run through the same model.
        site: the site to read there; None means the patched site itself.
        position: the one token position of ``prompt`` to take.

    Example:
        >>> Source("The capital of France is", position=-1)
        Source('The capital of France is')
    """

    prompt: str = attrs.field(converter=_converter(_prompt))
    site: Site | None = attrs.field(
        default=None, kw_only=True, converter=_converter(_optional_site)
    )
    position: int = attrs.field(default=-1, kw_only=True, converter=_converter(_position))

    def __repr__(self) -> str:
        return _code_repr(self)


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

    site: Site = attrs.field(converter=_converter(_site))
    value: TensorValue | None = attrs.field(
        default=None, kw_only=True, converter=_converter(_tensor)
    )
    source: Source | None = attrs.field(default=None, kw_only=True, converter=_converter(_source))
    positions: Positions = attrs.field(default=-1, kw_only=True, converter=_converter(_positions))

    def __attrs_post_init__(self) -> None:
        if (self.value is None) == (self.source is None):
            given = "both" if self.value is not None else "neither"
            raise ValueError(
                f"Patch(value=..., source=...): pass exactly one of value (a tensor) and "
                f"source (a Source), got {given}"
            )
        if self.value is not None and self.value.ndim == 0:
            raise ValueError(
                "Patch(value=...): value is 0-d, but its last dimension must be the "
                "site's width; pass a vector (or [positions, width] tensor)"
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

    layer: int = attrs.field(converter=_converter(_layer))
    vector: TensorValue = attrs.field(converter=_converter(_tensor))
    scale: float = attrs.field(default=1.0, kw_only=True, converter=_converter(_scale))
    positions: Positions = attrs.field(default=None, kw_only=True, converter=_converter(_positions))

    def __attrs_post_init__(self) -> None:
        if self.vector.ndim != 1:
            raise ValueError(
                f"Steer(vector=...): vector must be 1-D (hidden size), got shape "
                f"{list(self.vector.shape)}; pass e.g. vector.reshape(-1) or one row"
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

    layers: int | tuple[int, ...] | str = attrs.field(
        default="all", kw_only=True, converter=_converter(_layers)
    )
    positions: Positions = attrs.field(default=-1, kw_only=True, converter=_converter(_positions))
    steps: int | tuple[int, ...] | str = attrs.field(
        default=0, kw_only=True, converter=_converter(_steps)
    )
    top_k: int | None = attrs.field(default=None, kw_only=True, converter=_converter(_top_k))
    name: str = attrs.field(default="lens", kw_only=True, converter=_converter(_name))

    @property
    def output_name(self) -> str:
        return self.name


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

    site: Site = attrs.field(converter=_converter(_site))
    target: int | str = attrs.field(converter=_converter(_target))
    positions: Positions = attrs.field(default=-1, kw_only=True, converter=_converter(_positions))
    name: str | None = attrs.field(default=None, kw_only=True, converter=_converter(_name))

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

    layer: int = attrs.field(converter=_converter(_layer))
    name: str | None = attrs.field(default=None, kw_only=True, converter=_converter(_name))

    @property
    def output_name(self) -> str:
        return self.name if self.name is not None else f"attention_probs[{self.layer}]"


#: Every concrete node type, in the order the docs present them.
NODE_TYPES: tuple[type[Node], ...] = (Read, Zero, Patch, Steer, Lens, Grad, AttentionProbs)
