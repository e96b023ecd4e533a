"""JSON for graphs, as public functions: to_json / from_json, save / load, digest.

These are the functions ``nnterp.dsl`` exports. Each accepts a single node where a
graph is expected, and gives the same text as `Graph`'s own methods: the document
format, the canonical writer and the strict loader are `nnterp.dsl.codec`'s, driven by
the tag table `OPS` that the node classes fill as they are defined. What this module
adds is files, and `MAX_DOCUMENT_SIZE`, the one limit both `from_json` and `load`
apply (and tests lower).

This module never imports json, nnsight, vllm, transformers, the backends or the facade.
"""

from __future__ import annotations

import os
from typing import Mapping

from nnterp.dsl.codec import FORMAT_VERSION, decode
from nnterp.dsl.codec import MAX_DOCUMENT_SIZE as _CODEC_MAX_DOCUMENT_SIZE
from nnterp.dsl.graph import Graph, Node, as_graph
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

#: Largest document `from_json` and `load` accept, in characters (text) or bytes.
MAX_DOCUMENT_SIZE = _CODEC_MAX_DOCUMENT_SIZE
#: JSON ``op`` tag -> node class: `Node.ops`, read-only. The tag is the snake_case class
#: name, declared by each class (``Read.tag == "read"``), never derived while loading.
OPS: Mapping[str, type[Node]] = Node.ops


def to_json(graph: Graph | Node) -> str:
    """The canonical JSON text of a graph (or a single node, as a one-node graph).

    Every field is written, defaults included, with sorted keys, no whitespace and
    ASCII only, so the text (and `digest`) depends only on the graph's value.

    Raises:
        TypeError: a node's class has no JSON form (a user's subclass of `Node`).

    Example:
        >>> from nnterp.dsl import Read, Steer
        >>> to_json(Read("logits", positions=[0, -1]))
        '{"graph":[{"name":null,"op":"read","positions":[0,-1],"site":"logits","steps":0}],"nnterp_dsl":1}'
    """
    return as_graph(graph).to_json()


def digest(graph: Graph | Node) -> str:
    """The sha256 hex digest of the canonical JSON text.

    Example:
        >>> from nnterp.dsl import Lens
        >>> digest(Lens(layers=all)) == digest(Lens(layers="all"))
        True
    """
    return as_graph(graph).digest()


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
        $.graph[0].layer | layer must be an integer (a layer index), got boolean true
    """
    return Graph(decode(text, OPS, MAX_DOCUMENT_SIZE))


def save(graph: Graph | Node, path: str | os.PathLike) -> None:
    """Write ``graph``'s canonical JSON (plus a final newline) to ``path``.

    Example:
        >>> import os, tempfile
        >>> from nnterp.dsl import Lens
        >>> path = os.path.join(tempfile.mkdtemp(), "graph.json")
        >>> save(Lens(top_k=3), path)
        >>> open(path).read().splitlines() == [to_json(Lens(top_k=3))]
        True
    """
    text = to_json(graph) + "\n"
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


def load(path: str | os.PathLike) -> Graph:
    """Read a graph written by `save` (or by hand).

    Raises:
        GraphFormatError: the file is not a readable graph document.
        OSError: the file cannot be opened.

    Example:
        >>> import os, tempfile
        >>> from nnterp.dsl import Lens, Read
        >>> path = os.path.join(tempfile.mkdtemp(), "graph.json")
        >>> save(Read("logits") >> Lens(), path)
        >>> load(path)
        Graph([Read('logits'), Lens()])
    """
    with open(path, "rb") as handle:
        data = handle.read(MAX_DOCUMENT_SIZE + 1)
    try:
        return from_json(data)
    except GraphFormatError as err:
        raise GraphFormatError(
            err.problems, header=f"{os.fspath(path)} is not a readable nnterp graph document:"
        ) from None
