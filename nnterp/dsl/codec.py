"""JSON for node sequences: a versioned document, a canonical writer, a strict reader.

The document is ``{"nnterp_dsl": 1, "graph": [node, ...]}``. A node is an object whose
``"op"`` is its class's ``tag`` and whose other keys are exactly its fields (the
constructor's keywords). Sites are their strings, tuples are arrays, a `TensorValue` is
``{"dtype", "shape", "data"}`` with its raw little-endian bytes in base64, and any
other attrs value (a `Source`) is the object of its fields. The writer emits every
field, defaults included, with sorted keys and no whitespace: that text is canonical.

The reader trusts nothing. It parses with the standard library's JSON parser only and
checks structure first (version, keys, ``op``). Then it converts each field with that
field's own converter, found in its metadata (`nnterp.dsl.fields`), so the rules are
the constructors' rules, reported with JSON paths; only a field marked as holding a
JSON object (a tensor, a `Source`) is decoded from it first. Last, it builds each node
through its constructor, so rules between fields run too. It never imports or calls
anything the document names; every problem is reported at once, in one
`GraphFormatError`, and no other exception escapes `decode`.

The tag table is an argument, so this module imports neither `nnterp.dsl.graph` nor
`nnterp.dsl.nodes` (graph calls it). It never imports nnsight, vllm, transformers,
the backends or the facade.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
from typing import Any, Iterable, Mapping

import attrs

from nnterp.dsl.fields import (
    CONVERT,
    JSON_OBJECT,
    FieldError,
    Issue,
    field,
    to_ints,
    wrong_type,
    wrong_value,
)
from nnterp.dsl.sites import Site
from nnterp.dsl.values import DTYPES, TensorValue
from nnterp.errors import GraphFormatError

__all__ = ["FORMAT_VERSION", "MAX_DOCUMENT_SIZE", "MAX_TENSOR_NDIM", "encode", "decode"]

#: The format this module writes, and the newest it reads.
FORMAT_VERSION = 1
#: Largest document accepted, in characters (text) or bytes: 64 MiB. Larger graphs are
#: almost certainly not hand-made, and the limit bounds the loader's memory and time.
MAX_DOCUMENT_SIZE = 64 * 1024 * 1024
#: Most dimensions a stored tensor may have.
MAX_TENSOR_NDIM = 32

_TOP_KEYS = ("nnterp_dsl", "graph")


# -- writing ---------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, Site):
        return str(value)
    if isinstance(value, TensorValue):
        data = base64.b64encode(value.data).decode("ascii")
        return {"dtype": value.dtype, "shape": list(value.shape), "data": data}
    if attrs.has(type(value)):
        return {f.name: _encode(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value


def encode(nodes: Iterable[Any], ops: Mapping[str, type]) -> str:
    """The canonical JSON text of a sequence of nodes.

    Args:
        nodes: the nodes, in graph order.
        ops: the tag table (``Node.ops``): a node is written as the tag of its exact
            class, so a subclass without a tag of its own has no JSON form.

    Raises:
        TypeError: a node's class is not in ``ops``.

    Example:
        >>> from nnterp.dsl import Lens
        >>> from nnterp.dsl.graph import Node
        >>> encode([Lens(top_k=2)], Node.ops)
        '{"graph":[{"layers":"all","name":"lens","op":"lens","positions":-1,"steps":0,"top_k":2}],"nnterp_dsl":1}'
    """
    tags = {cls: tag for tag, cls in ops.items()}
    entries = []
    for index, node in enumerate(nodes):
        tag = tags.get(type(node))
        if tag is None:
            raise TypeError(
                f"nodes[{index}] is a {type(node).__name__}, which has no JSON form; only "
                f"the built-in nodes serialize ({', '.join(c.__name__ for c in ops.values())})"
            )
        entries.append({"op": tag, **_encode(node)})
    return json.dumps(
        {"nnterp_dsl": FORMAT_VERSION, "graph": entries},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


# -- reading ---------------------------------------------------------------------------


class _Object(dict):
    """A parsed JSON object that remembers keys it saw more than once (plain ``json``
    keeps the last silently; a strict loader reports them)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        obj.duplicates = tuple(dict.fromkeys(k for i, k in enumerate(keys) if k in keys[:i]))
    return obj


_BAD = object()  # a decoder's result when it reported a problem


def _kind(value: Any) -> str:
    """What a JSON value is, for messages: short, and never a dump of big values."""
    if value is None:
        return "null"
    if value is True or value is False:
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**30 else "(a very large number)"
        return f"integer {text}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {json.dumps(shown)}"
    if isinstance(value, list):
        return f"array of {len(value)} items"
    if isinstance(value, dict):
        return f"object with {len(value)} keys"
    return type(value).__name__  # a value already decoded from an object


class _Report:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> object:
        self.problems.append((path, message))
        return _BAD

    def issues(self, path: str, name: str, issues: Iterable[Issue]) -> object:
        """Report issues of field ``name`` (at ``path``), each at its own sub-path."""
        for issue in issues:
            self.add(path + issue.at, issue.text(name, _kind))
        return _BAD


def _key_path(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key[:40])}]"


def _check_keys(
    obj: _Object,
    path: str,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
    report: _Report,
    what: str,
) -> bool:
    count = len(report.problems)
    for key in obj.duplicates:
        report.add(_key_path(path, key), f"key {json.dumps(key[:40])} appears more than once")
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key[:100], allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report.add(
                _key_path(path, key),
                f"unknown field for {what} (fields: {', '.join(allowed)}){hint}",
            )
    for key in required:
        if key not in obj:
            report.add(path, f"missing required field {key!r} of {what}")
    return len(report.problems) == count


def _dtype(value: Any) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise wrong_type(f"must be one of {', '.join(DTYPES)}", value)
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise wrong_type("must be an array of integers", value)
    if len(value) > MAX_TENSOR_NDIM:
        raise wrong_value(f"must have at most {MAX_TENSOR_NDIM} dimensions", value)
    return to_ints(value, minimum=0, empty=True)


def _base64(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise wrong_type("must be a base64 string", value)
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as err:  # binascii.Error, or a non-ASCII string
        raise wrong_value(f"must be valid base64 ({err})", value) from None


@attrs.frozen
class _JsonTensor:
    """The JSON object of a `TensorValue`, checked field by field like a node."""

    dtype: str = field(_dtype)
    shape: tuple[int, ...] = field(_shape)
    data: bytes = field(_base64)


def _decode_field(attribute: attrs.Attribute, value: Any, path: str, report: _Report) -> Any:
    held = attribute.metadata.get(JSON_OBJECT)
    if held is not None and not (value is None and attribute.default is None):
        form = _JsonTensor if held is TensorValue else held
        if not isinstance(value, dict):
            keys = ", ".join(json.dumps(f.name) for f in attrs.fields(form))
            null = " or null" if attribute.default is None else ""
            rule = Issue(f"must be an object {{{keys}}}{null}", value)
            return report.issues(path, attribute.name, [rule])
        what = "a tensor" if held is TensorValue else f"a {held.__name__}"
        value = _decode_object(form, value, path, report, what)
        if isinstance(value, _JsonTensor):
            try:
                value = TensorValue(value.data, value.dtype, value.shape)
            except (TypeError, ValueError) as err:  # sizes that disagree, bool bytes
                return report.add(path, str(err))
        if value is _BAD:
            return _BAD
    convert = attribute.metadata.get(CONVERT)
    try:
        return value if convert is None else convert(value)
    except FieldError as err:
        return report.issues(path, attribute.name, err.issues)


def _decode_object(cls: type, obj: _Object, path: str, report: _Report, what: str) -> Any:
    """An instance of the attrs class ``cls`` from a JSON object, or `_BAD`: keys first,
    then each field's converter, then the constructor, for its rules between fields."""
    fields = attrs.fields(cls)
    required = tuple(f.name for f in fields if f.default is attrs.NOTHING)
    ok = _check_keys(obj, path, tuple(f.name for f in fields), required, report, what)
    kwargs = {
        f.name: _decode_field(f, obj[f.name], _key_path(path, f.name), report)
        for f in fields
        if f.name in obj
    }
    if not ok or any(value is _BAD for value in kwargs.values()):
        return _BAD
    try:
        return cls(**kwargs)
    except FieldError as err:
        name = err.fields[0] if len(err.fields) == 1 else ""
        return report.issues(_key_path(path, name) if name else path, name, err.issues)


def _decode_node(value: Any, path: str, report: _Report, ops: Mapping[str, type]) -> Any:
    if not isinstance(value, dict):
        return report.add(path, f'a node must be an object with an "op", got {_kind(value)}')
    op = value.get("op")
    if op is None and "op" not in value:
        return report.add(path, f"node has no \"op\"; known ops: {', '.join(ops)}")
    if not isinstance(op, str):
        return report.add(
            f"{path}.op", f"op must be a string, got {_kind(op)}; known ops: {', '.join(ops)}"
        )
    if op not in ops:
        close = difflib.get_close_matches(op[:100], ops, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return report.add(
            f"{path}.op", f"unknown op {json.dumps(op[:40])}; known ops: {', '.join(ops)}{hint}"
        )
    fields = _Object((k, v) for k, v in value.items() if k != "op")
    fields.duplicates = value.duplicates
    return _decode_object(ops[op], fields, path, report, f"op {op!r}")


def _parse(text: Any, max_size: int) -> Any:
    def fail(message: str) -> GraphFormatError:
        return GraphFormatError([("$", message)])

    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > max_size:
            raise fail(f"the document is larger than {max_size} bytes")
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise fail(
                f"the document is not UTF-8 text (invalid byte at offset {err.start})"
            ) from None
    elif isinstance(text, str):
        if len(text) > max_size:
            raise fail(f"the document is longer than {max_size} characters")
    else:
        raise fail(
            f"expected JSON text (str or bytes), got {type(text).__name__}; "
            "to build a graph from Python objects use Graph([...])"
        )
    if not text.strip():
        raise fail("the document is empty")
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as err:
        at_end = err.pos >= len(text.rstrip())
        hint = " (the document ends early: was it truncated?)" if at_end else ""
        raise fail(
            f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}{hint}"
        ) from None
    except RecursionError:
        raise fail("not a graph document: arrays or objects are nested too deeply") from None
    except ValueError:
        # json.loads raises a plain ValueError for an integer with more digits than
        # Python converts (4300 by default).
        raise fail("not a graph document: a number has far too many digits") from None


def decode(text: Any, ops: Mapping[str, type], max_size: int = MAX_DOCUMENT_SIZE) -> list:
    """The nodes of a JSON document (str or UTF-8 bytes), in order.

    Args:
        text: the document.
        ops: the tag table (``Node.ops``): the only classes a document can name.
        max_size: the largest document accepted, in characters or bytes.

    Raises:
        GraphFormatError: anything that is not a well-formed document of a format this
            nnterp reads, with every problem found and its JSON path. No other
            exception escapes, for any str or bytes.

    Example:
        >>> from nnterp.dsl.graph import Node
        >>> decode('{"nnterp_dsl": 1, "graph": [{"op": "lens"}]}', Node.ops)
        [Lens()]
        >>> node = '{"op": "read", "site": "logits", "positions": [0.5, 1, true]}'
        >>> try:
        ...     decode('{"nnterp_dsl": 1, "graph": [%s]}' % node, Node.ops)
        ... except GraphFormatError as err:
        ...     for path, message in err.problems:
        ...         print(path, "|", message)
        $.graph[0].positions[0] | positions[0] must be an integer, got number 0.5
        $.graph[0].positions[2] | positions[2] must be an integer, got boolean true
    """
    doc = _parse(text, max_size)
    if not isinstance(doc, dict):
        raise GraphFormatError(
            [("$", 'the document must be an object {"nnterp_dsl": 1, "graph": [...]}, '
              f"got {_kind(doc)}")]
        )
    version = doc.get("nnterp_dsl")
    if type(version) is int and version > FORMAT_VERSION:
        # A newer format may add anything; reporting its fields as unknown would mislead.
        raise GraphFormatError(
            [("$.nnterp_dsl", f"written by a newer nnterp (format {version}; this one reads "
              f"<= {FORMAT_VERSION}): upgrade nnterp")]
        )
    report = _Report()
    if "nnterp_dsl" not in doc:
        report.add(
            "$", 'missing "nnterp_dsl" (the format version): is this an nnterp graph document?'
        )
    elif type(version) is not int:
        report.add("$.nnterp_dsl", f"the format version must be an integer, got {_kind(version)}")
    elif version < 1:
        report.add("$.nnterp_dsl", f"unknown format version {version}; this nnterp reads format 1")
    for key in doc.duplicates:
        report.add(_key_path("$", key), f"key {json.dumps(key[:40])} appears more than once")
    for key in doc:
        if key not in _TOP_KEYS:
            report.add(
                _key_path("$", key), f"unknown top-level field (fields: {', '.join(_TOP_KEYS)})"
            )
    nodes = doc.get("graph", _BAD)
    if nodes is _BAD:
        report.add("$", 'missing "graph" (the array of nodes)')
    elif not isinstance(nodes, list):
        report.add("$.graph", f"graph must be an array of nodes, got {_kind(nodes)}")
    else:
        built = [_decode_node(node, f"$.graph[{i}]", report, ops) for i, node in enumerate(nodes)]
        if not report.problems:
            return built
    raise GraphFormatError(report.problems)
