"""Fields of DSL values: plain converters whose errors say which rule broke, and where.

A node's fields are checked by one converter each (``_positions``, ``_scale``...): a
plain function that returns the normalised value or raises `FieldError`. The error is
data, not a finished sentence: its `Issue` values hold the rule broken ("must be an
integer"), the offending value, the place inside the field (``"[0]"``) and whether the
value had the wrong type or a wrong value. Two readers finish the sentence. `field`
wraps the converter for attrs, so a constructor says
``Read(positions=...): positions[0] must be an integer, got bool True``; the JSON
loader (`nnterp.dsl.codec`) finds the same converter in the field's metadata and says
``$.graph[0].positions[0]: positions[0] must be an integer, got boolean true``. A
rule therefore lives in one place, and Python and JSON can never disagree about it.

This module imports attrs and the site vocabulary only: never json, torch, nnsight,
vllm, transformers or the backends.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import attrs

from nnterp.dsl.sites import Site
from nnterp.errors import NnterpError

__all__ = [
    "Issue", "FieldError", "FieldTypeError", "FieldValueError", "field", "wrong_type",
    "wrong_value", "foreign", "invalid", "optional", "to_int", "to_ints", "show", "code_repr",
    "CONVERT", "JSON_OBJECT",
]

#: Field metadata key: the field's plain converter (what the JSON loader calls).
CONVERT = "nnterp.convert"
#: Field metadata key: the class whose JSON object the field holds (`TensorValue`,
#: `Source`), for fields whose JSON form is not the value itself; None otherwise.
JSON_OBJECT = "nnterp.json_object"

_NOT_SHOWN = object()


class Issue(NamedTuple):
    """One rule a value broke.

    Attributes:
        rule: what the value must be (``"must be >= 0"``), or, when ``value`` is not
            given, a whole sentence that already says what was received.
        value: the offending value, described by whoever writes the message.
        at: where inside the field: ``""`` for the value itself, ``"[2]"`` for an item.
        wrong_type: True for a value of the wrong type (TypeError), False for a value
            of the right type that breaks a rule (ValueError).
    """

    rule: str
    value: Any = _NOT_SHOWN
    at: str = ""
    wrong_type: bool = True

    def text(self, name: str, describe: Callable[[Any], str]) -> str:
        """The issue as a sentence about field ``name``, values shown by ``describe``."""
        if self.value is _NOT_SHOWN:
            return self.rule
        return f"{name}{self.at} {self.rule}, got {describe(self.value)}".lstrip()


class FieldError(NnterpError):
    """Field values broke their rules; raised by constructors and converters.

    Built with `FieldError.of`, which returns a `TypeError` or `ValueError` subclass
    after the first issue, so callers catch what they always caught, and code that
    reports elsewhere (the JSON loader) reads the structure instead of the message.

    Attributes:
        issues: every rule broken, e.g. one per bad item of a list.
        owner: the class being built (``"Read"``), once known.
        fields: the fields the issues concern: one, or several for a rule between
            fields (Patch's "exactly one of value and source").
    """

    def __init__(self, issues: Sequence[Issue], owner: str | None = None, fields=()) -> None:
        super().__init__(tuple(issues), owner, tuple(fields))
        self.issues, self.owner, self.fields = self.args

    @staticmethod
    def of(issues: Sequence[Issue], owner: str | None = None, fields=()) -> "FieldError":
        """A `FieldTypeError` or `FieldValueError`, after the first issue's kind."""
        kind = FieldTypeError if issues[0].wrong_type else FieldValueError
        return kind(issues, owner, fields)

    def __str__(self) -> str:
        # Written when asked for: the JSON loader reads the issues and never needs it,
        # which spares it describing (repr-ing) whatever a document holds.
        name = self.fields[0] if len(self.fields) == 1 else ""
        text = "; ".join(issue.text(name, show) for issue in self.issues)
        if self.owner is None:
            return text
        return f"{self.owner}({', '.join(f'{f}=...' for f in self.fields)}): {text}"


class FieldTypeError(FieldError, TypeError):
    """A `FieldError` for a value of the wrong type."""


class FieldValueError(FieldError, ValueError):
    """A `FieldError` for a value of the right type that breaks a rule."""


def wrong_type(rule: str, value: Any) -> FieldError:
    """A `FieldError` (TypeError) for one value of the wrong type."""
    return FieldError.of([Issue(rule, value)])


def wrong_value(rule: str, value: Any) -> FieldError:
    """A `FieldError` (ValueError) for one value that breaks a rule."""
    return FieldError.of([Issue(rule, value, wrong_type=False)])


def foreign(err: Exception) -> FieldError:
    """A `FieldError` from another class's TypeError/ValueError, whose message already
    names the value (`Site.parse`, `TensorValue`)."""
    return FieldError.of([Issue(str(err), wrong_type=isinstance(err, TypeError))])


def invalid(instance: Any, fields: Sequence[str], message: str) -> FieldError:
    """A `FieldError` (ValueError) from a rule between fields, checked once each field
    is converted (in ``__attrs_post_init__``); ``message`` says what was received."""
    return FieldError.of([Issue(message, wrong_type=False)], type(instance).__name__, fields)


def field(
    convert: Callable[[Any], Any], default: Any = attrs.NOTHING, json_object: type | None = None
) -> Any:
    """An attrs field checked and normalised by ``convert``.

    Required fields are positional and fields with a default keyword-only, so the
    leading required fields read as in SPEC.md (``Read(site)``) and keyword names are
    the JSON keys.

    Args:
        convert: a plain converter: value in, normalised value out, `FieldError` out
            for a bad value. It must accept its own output (the JSON loader converts
            each field, then builds the object, which converts again).
        default: the default value; none makes the field required.
        json_object: see `JSON_OBJECT`.

    Example:
        >>> @attrs.frozen
        ... class Box:
        ...     size: int = field(lambda v: to_int(v, minimum=1))
        >>> Box(size=3).size
        3
        >>> try:
        ...     Box(size=0)
        ... except ValueError as err:
        ...     print(err, "|", err.fields, err.issues[0].rule)
        Box(size=...): size must be >= 1, got int 0 | ('size',) must be >= 1
    """

    def in_constructor(value: Any, instance: Any, attribute: attrs.Attribute) -> Any:
        try:
            return convert(value)
        except FieldError as err:
            raise FieldError.of(err.issues, type(instance).__name__, [attribute.name]) from None

    return attrs.field(
        default=default,
        kw_only=default is not attrs.NOTHING,
        converter=attrs.Converter(in_constructor, takes_self=True, takes_field=True),
        metadata={CONVERT: convert, JSON_OBJECT: json_object},
    )


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert``, letting None through."""
    return lambda value: None if value is None else convert(value)


def to_int(value: Any, minimum: int | None = None, rule: str = "must be an integer") -> int:
    """``value`` as an int, accepting integer-like scalars (numpy, 0-d tensors) but
    never bools or floats: ``True`` as a layer or ``2.0`` as a position is a bug in the
    caller, not a request (and in JSON, ``1.0`` and ``true`` are not integers).

    Example:
        >>> to_int(3), to_int(5, minimum=0)
        (3, 5)
    """
    try:
        if isinstance(value, (bool, float)):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise wrong_type(rule, value) from None
    if minimum is not None and number < minimum:
        raise wrong_value(f"must be >= {minimum}", number)
    return number


def to_ints(value: Iterable, minimum: int | None = None, empty: bool = False) -> tuple[int, ...]:
    """Every item of ``value`` through `to_int`, reporting every bad item at its index.

    Example:
        >>> to_ints(range(3))
        (0, 1, 2)
        >>> try:
        ...     to_ints([1.5, 2, True])
        ... except FieldError as err:
        ...     print(err)
        [0] must be an integer, got float 1.5; [2] must be an integer, got bool True
    """
    items = tuple(value)
    if not items and not empty:
        raise wrong_value("must not be empty", value)
    numbers, issues = [], []
    for index, item in enumerate(items):
        try:
            numbers.append(to_int(item, minimum))
        except FieldError as err:
            issues.extend(issue._replace(at=f"[{index}]{issue.at}") for issue in err.issues)
    if issues:
        raise FieldError.of(issues)
    return tuple(numbers)


def show(value: Any) -> str:
    """A Python value for error messages: its type and a short repr, never a dump."""
    text = repr(value) if not isinstance(value, (list, tuple)) or len(value) < 8 else (
        f"{type(value).__name__} of {len(value)} items"
    )
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def code_repr(obj: Any) -> str:
    """``ClassName(positional, keyword=value)``, showing keywords only when they differ
    from their default, so the repr reads like the shortest code that builds ``obj``."""
    parts = []
    for attribute in attrs.fields(type(obj)):
        value = getattr(obj, attribute.name)
        shown = repr(str(value)) if isinstance(value, Site) else repr(value)
        if not attribute.kw_only:
            parts.append(shown)
        elif value != attribute.default:
            parts.append(f"{attribute.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"
