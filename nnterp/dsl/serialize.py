"""JSON for graphs: a versioned document, a canonical form and digest, a strict loader.

The document is ``{"nnterp_dsl": 1, "graph": [node, ...]}``. Each node is an object whose
``"op"`` is the snake_case name of its class, from the table `OPS` (written out, never
derived while loading), and whose other keys are exactly the constructor's keyword
names. Sites are their canonical strings, tuples are arrays, a `Source` is
``{"prompt", "site", "position"}`` and a `TensorValue` is ``{"dtype", "shape", "data"}``
with the raw little-endian bytes in base64. The writer emits every field, defaults
included, with sorted keys and no whitespace: that text is canonical, so equal graphs
give equal text and `digest` (its sha256) is stable across processes and machines.

The loader trusts nothing. It parses with the standard library's JSON parser only,
checks the document against the tables here (structure first: version, keys, ``op``,
field types, JSON paths in every message), and builds nodes only through their
constructors, so their own checks run too. It never imports or calls anything the
document names. Every problem found is reported at once, in one `GraphFormatError`,
and no other exception escapes `from_json`, whatever text it is given.

This module never imports nnsight, vllm, transformers, the backends or the facade.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import json
import math
import os
import re
from typing import Any, Callable

import attrs

from nnterp.dsl.graph import Graph, as_graph
from nnterp.dsl.nodes import (
    AttentionProbs,
    Grad,
    Lens,
    Node,
    Patch,
    Read,
    Source,
    Steer,
    Zero,
)
from nnterp.dsl.sites import Site
from nnterp.dsl.values import DTYPES, TensorValue
from nnterp.errors import GraphFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAX_DOCUMENT_SIZE",
    "OPS",
    "to_json",
    "from_json",
    "digest",
    "save",
    "load",
]

#: The format this module writes, and the newest it reads.
FORMAT_VERSION = 1
#: Largest document accepted, in characters (text) or bytes: 64 MiB. Larger graphs are
#: almost certainly not hand-made, and the limit bounds the loader's memory and time.
MAX_DOCUMENT_SIZE = 64 * 1024 * 1024
#: Most dimensions a stored tensor may have.
MAX_TENSOR_NDIM = 32

#: JSON ``op`` tag -> node class. The tag is the snake_case class name.
OPS: dict[str, type[Node]] = {
    "read": Read,
    "zero": Zero,
    "patch": Patch,
    "steer": Steer,
    "lens": Lens,
    "grad": Grad,
    "attention_probs": AttentionProbs,
}
_TAG_OF: dict[type[Node], str] = {cls: tag for tag, cls in OPS.items()}

_TOP_KEYS = ("nnterp_dsl", "graph")
_TENSOR_KEYS = ("dtype", "shape", "data")


# -- writing ---------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, Site):
        return str(value)
    if isinstance(value, TensorValue):
        return {
            "dtype": value.dtype,
            "shape": list(value.shape),
            "data": base64.b64encode(value.data).decode("ascii"),
        }
    if isinstance(value, Source):
        return {name: _encode(getattr(value, name)) for name in ("prompt", "site", "position")}
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value


def _document(graph: Graph) -> dict[str, Any]:
    nodes = []
    for index, node in enumerate(graph):
        tag = _TAG_OF.get(type(node))
        if tag is None:
            raise TypeError(
                f"nodes[{index}] is a {type(node).__name__}, which has no JSON form; only "
                f"the built-in nodes serialize ({', '.join(c.__name__ for c in OPS.values())})"
            )
        entry = {"op": tag}
        for field in attrs.fields(type(node)):
            entry[field.name] = _encode(getattr(node, field.name))
        nodes.append(entry)
    return {"nnterp_dsl": FORMAT_VERSION, "graph": nodes}


def to_json(graph: Graph | Node) -> str:
    """The canonical JSON text of a graph (or a single node, as a one-node graph).

    Every field is written, defaults included, with sorted keys, no whitespace and
    ASCII only, so the text (and `digest`) depends only on the graph's value.

    Example:
        >>> from nnterp.dsl import Read, Steer
        >>> to_json(Read("logits", positions=[0, -1]))
        '{"graph":[{"name":null,"op":"read","positions":[0,-1],"site":"logits","steps":0}],"nnterp_dsl":1}'
    """
    return json.dumps(
        _document(as_graph(graph)),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def digest(graph: Graph | Node) -> str:
    """The sha256 hex digest of the canonical JSON text.

    Example:
        >>> from nnterp.dsl import Lens
        >>> digest(Lens(layers=all)) == digest(Lens(layers="all"))
        True
    """
    return hashlib.sha256(to_json(graph).encode("ascii")).hexdigest()


def save(graph: Graph | Node, path: str | os.PathLike) -> None:
    """Write ``graph``'s canonical JSON (plus a final newline) to ``path``."""
    text = to_json(graph) + "\n"
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


def load(path: str | os.PathLike) -> Graph:
    """Read a graph written by `save` (or by hand).

    Raises:
        GraphFormatError: the file is not a readable graph document.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as handle:
        data = handle.read(MAX_DOCUMENT_SIZE + 1)
    try:
        return from_json(data)
    except GraphFormatError as err:
        raise GraphFormatError(
            err.problems, header=f"{os.fspath(path)} is not a readable nnterp graph document:"
        ) from None


# -- reading ---------------------------------------------------------------------------


class _Object(dict):
    """A parsed JSON object that remembers keys it saw more than once (plain ``json``
    keeps the last silently; a strict loader reports them)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dups = []
        for key, _ in pairs:
            if key in seen and key not in dups:
                dups.append(key)
            seen.add(key)
        obj.duplicates = tuple(dups)
    return obj


_BAD = object()  # a decoder's result when it reported a problem


class _Report:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> object:
        self.problems.append((path, message))
        return _BAD


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
    return f"object with {len(value)} keys"


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
    ok = True
    for key in obj.duplicates:
        report.add(_key_path(path, key), f"key {json.dumps(key[:40])} appears more than once")
        ok = False
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key[:100], allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report.add(
                _key_path(path, key),
                f"unknown field for {what} (fields: {', '.join(allowed)}){hint}",
            )
            ok = False
    for key in required:
        if key not in obj:
            report.add(path, f"missing required field {key!r} of {what}")
            ok = False
    return ok


def _int(value: Any, path: str, report: _Report, what: str, minimum: int | None = None) -> Any:
    # bool is an int subclass in Python, and true/false are not numbers in JSON.
    if type(value) is not int:
        return report.add(path, f"{what} must be an integer, got {_kind(value)}")
    if minimum is not None and value < minimum:
        return report.add(path, f"{what} must be >= {minimum}, got {value}")
    return value


def _int_list(
    value: list, path: str, report: _Report, what: str, minimum: int | None = None
) -> Any:
    if not value:
        return report.add(path, f"{what} must not be an empty array")
    items = [
        _int(item, f"{path}[{i}]", report, f"each of {what}", minimum)
        for i, item in enumerate(value)
    ]
    return _BAD if any(item is _BAD for item in items) else items


def _d_site(value: Any, path: str, report: _Report) -> Any:
    if not isinstance(value, str):
        return report.add(
            path, f'site must be a string such as "layers[5].output", got {_kind(value)}'
        )
    try:
        return Site.parse(value)
    except ValueError as err:
        return report.add(path, str(err))


def _d_optional_site(value: Any, path: str, report: _Report) -> Any:
    return None if value is None else _d_site(value, path, report)


def _d_layer(value: Any, path: str, report: _Report) -> Any:
    return _int(value, path, report, "layer")


def _d_positions(value: Any, path: str, report: _Report) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return _int_list(value, path, report, "positions")
    if type(value) is int:
        return value
    return report.add(
        path, f"positions must be an integer, an array of integers or null, got {_kind(value)}"
    )


def _d_position(value: Any, path: str, report: _Report) -> Any:
    return _int(value, path, report, "position")


def _d_steps(value: Any, path: str, report: _Report) -> Any:
    if value == "all" and isinstance(value, str):
        return value
    if isinstance(value, list):
        return _int_list(value, path, report, "steps", minimum=0)
    if type(value) is int:
        return _int(value, path, report, "steps", minimum=0)
    return report.add(
        path, f'steps must be an integer, an array of integers or "all", got {_kind(value)}'
    )


def _d_layers(value: Any, path: str, report: _Report) -> Any:
    if value == "all" and isinstance(value, str):
        return value
    if isinstance(value, list):
        return _int_list(value, path, report, "layers")
    if type(value) is int:
        return value
    return report.add(
        path, f'layers must be "all", an integer or an array of integers, got {_kind(value)}'
    )


def _d_optional_name(value: Any, path: str, report: _Report) -> Any:
    return None if value is None else _d_name(value, path, report)


def _d_name(value: Any, path: str, report: _Report) -> Any:
    if not isinstance(value, str):
        return report.add(path, f"name must be a string, got {_kind(value)}")
    if not value:
        return report.add(path, "name must not be empty")
    return value


def _d_scale(value: Any, path: str, report: _Report) -> Any:
    if type(value) is int:
        if abs(value) > 2**1023:
            return report.add(path, f"scale must be a finite number, got {_kind(value)}")
        return float(value)
    if type(value) is not float:
        return report.add(path, f"scale must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        return report.add(path, f"scale must be finite, got {value!r}")
    return value


def _d_top_k(value: Any, path: str, report: _Report) -> Any:
    return None if value is None else _int(value, path, report, "top_k", minimum=1)


def _d_target(value: Any, path: str, report: _Report) -> Any:
    if isinstance(value, str):
        return value
    if type(value) is int:
        return _int(value, path, report, "target token id", minimum=0)
    return report.add(path, f"target must be a token id (integer) or a string, got {_kind(value)}")


def _d_tensor(value: Any, path: str, report: _Report) -> Any:
    if not isinstance(value, dict):
        return report.add(
            path, f'a tensor must be an object {{"dtype", "shape", "data"}}, got {_kind(value)}'
        )
    if not _check_keys(value, path, _TENSOR_KEYS, _TENSOR_KEYS, report, "a tensor"):
        return _BAD
    ok = True
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        report.add(f"{path}.dtype", f"dtype must be one of {', '.join(DTYPES)}, got {_kind(dtype)}")
        ok = False
    if not isinstance(shape, list):
        report.add(f"{path}.shape", f"shape must be an array of integers, got {_kind(shape)}")
        ok = False
    elif len(shape) > MAX_TENSOR_NDIM:
        report.add(
            f"{path}.shape",
            f"a tensor may have at most {MAX_TENSOR_NDIM} dimensions, got {len(shape)}",
        )
        ok = False
    else:
        dims = [
            _int(d, f"{path}.shape[{i}]", report, "a dimension", minimum=0)
            for i, d in enumerate(shape)
        ]
        ok = ok and all(d is not _BAD for d in dims)
    raw = b""
    if not isinstance(data, str):
        report.add(f"{path}.data", f"data must be a base64 string, got {_kind(data)}")
        ok = False
    else:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            report.add(f"{path}.data", f"data is not valid base64 ({err})")
            ok = False
    if not ok:
        return _BAD
    try:
        return TensorValue(raw, dtype, tuple(shape))
    except (TypeError, ValueError) as err:
        return report.add(path, str(err))


def _d_optional_tensor(value: Any, path: str, report: _Report) -> Any:
    return None if value is None else _d_tensor(value, path, report)


def _d_prompt(value: Any, path: str, report: _Report) -> Any:
    if not isinstance(value, str):
        return report.add(path, f"prompt must be a string, got {_kind(value)}")
    if not value:
        return report.add(path, "prompt must not be empty")
    return value


_SOURCE_FIELDS: dict[str, Callable[[Any, str, _Report], Any]] = {
    "prompt": _d_prompt,
    "site": _d_optional_site,
    "position": _d_position,
}


def _d_source(value: Any, path: str, report: _Report) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        return report.add(
            path,
            f'source must be an object {{"prompt", "site", "position"}} or null, '
            f"got {_kind(value)}",
        )
    return _build(Source, _SOURCE_FIELDS, value, path, report, "a Source")


Decoder = Callable[[Any, str, _Report], Any]
#: op -> field -> decoder; the keys must be the class's attrs fields (checked below).
_FIELDS: dict[str, dict[str, Decoder]] = {
    "read": {
        "site": _d_site,
        "positions": _d_positions,
        "steps": _d_steps,
        "name": _d_optional_name,
    },
    "zero": {"site": _d_site, "positions": _d_positions},
    "patch": {
        "site": _d_site,
        "value": _d_optional_tensor,
        "source": _d_source,
        "positions": _d_positions,
    },
    "steer": {
        "layer": _d_layer,
        "vector": _d_tensor,
        "scale": _d_scale,
        "positions": _d_positions,
    },
    "lens": {
        "layers": _d_layers,
        "positions": _d_positions,
        "steps": _d_steps,
        "top_k": _d_top_k,
        "name": _d_name,
    },
    "grad": {
        "site": _d_site,
        "target": _d_target,
        "positions": _d_positions,
        "name": _d_optional_name,
    },
    "attention_probs": {"layer": _d_layer, "name": _d_optional_name},
}


def _check_tables() -> None:
    # A node class and its decoder table must never drift apart: a field added to a
    # class but not here would be written by to_json and refused by from_json.
    for op, cls in OPS.items():
        fields = {f.name for f in attrs.fields(cls)}
        if set(_FIELDS[op]) != fields:
            raise RuntimeError(f"nnterp bug: JSON fields of op {op!r} differ from {cls.__name__}'s")


_check_tables()

# "Steer(vector=...): ..." -> "vector": constructor messages name their field this way.
_CONSTRUCTOR_FIELD = re.compile(r"^\w+\((\w+)=\.\.\.\)")


def _build(
    cls: type, fields: dict[str, Decoder], obj: _Object, path: str, report: _Report, what: str
) -> Any:
    required = tuple(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING)
    ok = _check_keys(obj, path, tuple(fields), required, report, what)
    kwargs = {}
    for key, decode in fields.items():
        if key in obj:
            value = decode(obj[key], _key_path(path, key), report)
            if value is _BAD:
                ok = False
            kwargs[key] = value
    if not ok:
        return _BAD
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        # The node's own checks (cross-field rules, ranks): report where they point.
        message = str(err)
        match = _CONSTRUCTOR_FIELD.match(message)
        return report.add(_key_path(path, match.group(1)) if match else path, message)


def _d_node(value: Any, path: str, report: _Report) -> Any:
    if not isinstance(value, dict):
        return report.add(path, f'a node must be an object with an "op", got {_kind(value)}')
    op = value.get("op")
    if op is None and "op" not in value:
        return report.add(path, f"node has no \"op\"; known ops: {', '.join(OPS)}")
    if not isinstance(op, str):
        return report.add(
            f"{path}.op", f"op must be a string, got {_kind(op)}; known ops: {', '.join(OPS)}"
        )
    if op not in OPS:
        close = difflib.get_close_matches(op[:100], OPS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return report.add(
            f"{path}.op",
            f"unknown op {json.dumps(op[:40])}; known ops: {', '.join(OPS)}{hint}",
        )
    rest = _Object((k, v) for k, v in value.items() if k != "op")
    rest.duplicates = getattr(value, "duplicates", ())
    return _build(OPS[op], _FIELDS[op], rest, path, report, f"op {op!r}")


def _parse(text: Any) -> Any:
    def fail(message: str) -> GraphFormatError:
        return GraphFormatError([("$", message)])

    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > MAX_DOCUMENT_SIZE:
            raise fail(f"the document is larger than {MAX_DOCUMENT_SIZE} bytes")
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise fail(
                f"the document is not UTF-8 text (invalid byte at offset {err.start})"
            ) from None
    elif isinstance(text, str):
        if len(text) > MAX_DOCUMENT_SIZE:
            raise fail(f"the document is longer than {MAX_DOCUMENT_SIZE} characters")
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


def from_json(text: str | bytes) -> Graph:
    """Read a graph from JSON text (str or UTF-8 bytes).

    Raises:
        GraphFormatError: anything that is not a well-formed graph document of a format
            this nnterp reads, with every problem found and its JSON path
            (``err.problems``). No other exception escapes, for any str or bytes.

    Example:
        >>> from nnterp.dsl import GraphFormatError
        >>> g = from_json('{"nnterp_dsl": 1, "graph": [{"op": "lens", "top_k": 5}]}')
        >>> g
        Graph([Lens(top_k=5)])
        >>> try:
        ...     from_json('{"nnterp_dsl": 1, "graph": [{"op": "steer", "layer": true}]}')
        ... except GraphFormatError as err:
        ...     for path, message in err.problems:
        ...         print(path, "|", message)
        $.graph[0] | missing required field 'vector' of op 'steer'
        $.graph[0].layer | layer must be an integer, got boolean true
    """
    doc = _parse(text)
    report = _Report()
    if not isinstance(doc, dict):
        raise GraphFormatError(
            [
                (
                    "$",
                    f'the document must be an object {{"nnterp_dsl": 1, "graph": [...]}}, '
                    f"got {_kind(doc)}",
                )
            ]
        )
    version = doc.get("nnterp_dsl")
    if type(version) is int and version > FORMAT_VERSION:
        # A newer format may add anything; reporting its fields as unknown would mislead.
        raise GraphFormatError(
            [
                (
                    "$.nnterp_dsl",
                    f"written by a newer nnterp (format {version}; this one reads <= "
                    f"{FORMAT_VERSION}): upgrade nnterp",
                )
            ]
        )
    if "nnterp_dsl" not in doc:
        report.add(
            "$", 'missing "nnterp_dsl" (the format version): is this an nnterp graph document?'
        )
    elif type(version) is not int:
        report.add("$.nnterp_dsl", f"the format version must be an integer, got {_kind(version)}")
    elif version < 1:
        report.add("$.nnterp_dsl", f"unknown format version {version}; this nnterp reads format 1")
    for key in doc.duplicates if isinstance(doc, _Object) else ():
        report.add(_key_path("$", key), f"key {json.dumps(key[:40])} appears more than once")
    for key in doc:
        if key not in _TOP_KEYS:
            report.add(
                _key_path("$", key), f'unknown top-level field (fields: {", ".join(_TOP_KEYS)})'
            )
    nodes = doc.get("graph", _BAD)
    if nodes is _BAD:
        report.add("$", 'missing "graph" (the array of nodes)')
    elif not isinstance(nodes, list):
        report.add("$.graph", f"graph must be an array of nodes, got {_kind(nodes)}")
    else:
        built = [_d_node(node, f"$.graph[{i}]", report) for i, node in enumerate(nodes)]
        if not report.problems:
            return Graph(built)
    raise GraphFormatError(report.problems)
