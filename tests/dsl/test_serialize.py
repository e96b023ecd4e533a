"""JSON: exact round trips, the canonical form and digest, and the strict loader.

The loader's contract is that any str or bytes either gives a Graph or raises
GraphFormatError; the hypothesis tests below feed it thousands of random and mutated
documents to hold it to that.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import subprocess
import sys

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnterp.dsl import (
    AttentionProbs,
    Grad,
    Graph,
    GraphFormatError,
    Lens,
    Patch,
    Read,
    Source,
    Steer,
    Zero,
    from_json,
    load,
    save,
    to_json,
)
from nnterp.dsl import serialize
from nnterp.errors import NnterpError

EVERY_FORM = [
    Read("layers[5].output"),
    Read("layers[-1].input", positions=None, steps="all", name="x"),
    Read("attentions[0].output", positions=[0, -1], steps=[0, 3]),
    Read("logits", positions=3, steps=2),
    Zero("mlps[2].output"),
    Zero("embeddings.output", positions=range(3)),
    Patch("logits", value=torch.randn(2, 5).to(torch.bfloat16)),
    Patch("layers[1].output", value=torch.empty(0, 8), positions=None),
    Patch("layers[1].output", value=torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).double()),
    Patch("layers[1].output", value=torch.randn(3).half(), positions=[1]),
    Patch("embeddings.output", source=Source("other")),
    Patch("layers[3].input", source=Source("x", site="layers[-2].output", position=4), positions=(0, 2)),
    Steer(-2, torch.ones(4, dtype=torch.float64), scale=-0.5),
    Steer(3, [1e-320, 1e308, -3.5], scale=1e-300, positions=[0]),
    Lens(),
    Lens(layers=range(3), steps=[1, 2], top_k=3, positions=None, name="l2"),
    Lens(layers=-1),
    Lens(layers=[4, 0]),
    Grad("attentions[0].output", "Paris"),
    Grad("logits", 7, name="n", positions=[-2, -1]),
    Grad("layers[0].output", ""),
    AttentionProbs(0, name="a"),
    AttentionProbs(-3),
]


@pytest.mark.parametrize("node", EVERY_FORM, ids=repr)
def test_every_node_form_round_trips_exactly(node):
    g = Graph([node])
    text = g.to_json()
    back = Graph.from_json(text)
    assert back == g and hash(back) == hash(g)
    assert back.to_json() == text
    if isinstance(node, (Patch, Steer)):
        tensor = node.value if isinstance(node, Patch) else node.vector
        if tensor is not None:
            restored = (back[0].value if isinstance(node, Patch) else back[0].vector).to_tensor()
            assert restored.dtype == tensor.to_tensor().dtype
            assert restored.view(torch.uint8).tolist() == tensor.to_tensor().view(torch.uint8).tolist()


def test_whole_graph_round_trips_and_digest_is_canonical():
    g = Graph(EVERY_FORM)
    text = to_json(g)
    assert from_json(text) == g
    assert from_json(text.encode()) == g
    assert g.digest() == hashlib.sha256(text.encode()).hexdigest()
    # Any spelling of the same document has the same graph and digest.
    spaced = json.dumps(json.loads(text), indent=2)
    assert from_json(spaced).digest() == g.digest()
    # Defaults may be omitted by hand-written documents.
    short = '{"nnterp_dsl":1,"graph":[{"op":"lens"},{"site":"logits","op":"read"}]}'
    assert from_json(short) == Lens() >> Read("logits")
    assert from_json(short).to_json() == (Lens() >> Read("logits")).to_json()


def test_canonical_text_is_fixed():
    g = Read("layers[5].output", positions=[0, -1]) >> Steer(2, [1.0, -2.0], scale=3) >> Lens(top_k=5)
    expected = (
        '{"graph":['
        '{"name":null,"op":"read","positions":[0,-1],"site":"layers[5].output","steps":0},'
        '{"layer":2,"op":"steer","positions":null,"scale":3.0,'
        '"vector":{"data":"AACAPwAAAMA=","dtype":"float32","shape":[2]}},'
        '{"layers":"all","name":"lens","op":"lens","positions":-1,"steps":0,"top_k":5}'
        '],"nnterp_dsl":1}'
    )
    assert g.to_json() == expected
    assert g.digest() == hashlib.sha256(expected.encode("ascii")).hexdigest()


def test_digest_is_stable_across_processes():
    code = (
        "import torch\n"
        "from nnterp.dsl import Graph, Patch, Read, Source, Steer\n"
        "g = Steer(1, torch.arange(6, dtype=torch.float32) / 7) >> Read('logits', name='é') "
        ">> Patch('layers[0].output', source=Source('snow ☃'))\n"
        "print(g.digest())\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    g = (
        Steer(1, torch.arange(6, dtype=torch.float32) / 7)
        >> Read("logits", name="é")
        >> Patch("layers[0].output", source=Source("snow ☃"))
    )
    assert other.stdout.strip() == g.digest()
    assert g.to_json().isascii()


def test_equal_graphs_from_different_argument_forms_have_equal_text():
    pairs = [
        (Lens(layers=all), Lens(layers="all")),
        (Steer(1, [1.0], scale=2), Steer(1, torch.tensor([1.0]), scale=2.0)),
        (Steer(1, [1.0], scale=-0.0), Steer(1, [1.0], scale=0.0)),
        (Read("logits", positions=[1, 2]), Read("logits", positions=range(1, 3))),
    ]
    for a, b in pairs:
        assert a == b and to_json(a) == to_json(b)
    # Different values, different text: an int position is not a one-element list.
    assert to_json(Read("logits", positions=1)) != to_json(Read("logits", positions=[1]))


def test_save_and_load(tmp_path):
    g = Graph(EVERY_FORM)
    path = tmp_path / "graph.json"
    save(g, path)
    assert load(path) == g
    assert load(str(path)) == g
    assert path.read_text() == g.to_json() + "\n"
    save(Lens(), path)  # a single node is a one-node graph
    assert load(path) == Graph([Lens()])


def test_only_built_in_nodes_serialize():
    from nnterp.dsl.nodes import Node

    @attrs.frozen
    class Custom(Node):
        x: int = 0

    with pytest.raises(TypeError, match=r"nodes\[1\] is a Custom"):
        to_json(Lens() >> Custom())


def test_load_reports_the_file(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text('{"nnterp_dsl": 1, "graph": [{"op": "nope"}]}')
    with pytest.raises(GraphFormatError) as info:
        load(path)
    assert str(path) in str(info.value).splitlines()[0]
    assert info.value.problems[0][0] == "$.graph[0].op"
    monkeypatch.setattr(serialize, "MAX_DOCUMENT_SIZE", 100)
    path.write_text('{"nnterp_dsl":1,"graph":[' + '{"op":"lens"},' * 20 + '{"op":"lens"}]}')
    with pytest.raises(GraphFormatError, match="larger than 100 bytes"):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.json")


# -- the strict loader -----------------------------------------------------------------


def _doc(*nodes, version=1):
    return json.dumps({"nnterp_dsl": version, "graph": list(nodes)})


TENSOR = {"dtype": "float32", "shape": [2], "data": "AACAPwAAAMA="}

MALFORMED = [
    # (document, [(path, message fragment), ...]) -- every problem, in order
    ("", [("$", "empty")]),
    ("   \n", [("$", "empty")]),
    ("{", [("$", "truncated")]),
    ('{"nnterp_dsl": 1, "graph": [{"op": "lens"}', [("$", "truncated")]),
    ("nonsense", [("$", "not valid JSON")]),
    ("[1, 2]", [("$", "must be an object")]),
    ('"text"', [("$", "must be an object")]),
    ("null", [("$", "must be an object")]),
    (_doc(version=2), [("$.nnterp_dsl", "written by a newer nnterp (format 2; this one reads <= 1): upgrade nnterp")]),
    ('{"nnterp_dsl": 7, "graph": 5, "future": true}', [("$.nnterp_dsl", "format 7")]),
    (_doc(version=0), [("$.nnterp_dsl", "unknown format version 0")]),
    (_doc(version=True), [("$.nnterp_dsl", "got boolean true")]),
    (_doc(version=1.0), [("$.nnterp_dsl", "got number 1.0")]),
    (_doc(version="1"), [("$.nnterp_dsl", 'got string "1"')]),
    ('{"graph": []}', [("$", 'missing "nnterp_dsl"')]),
    ('{"nnterp_dsl": 1}', [("$", 'missing "graph"')]),
    ('{"nnterp_dsl": 1, "graph": {}}', [("$.graph", "must be an array")]),
    ('{"nnterp_dsl": 1, "graph": [], "nodes": []}', [("$.nodes", "unknown top-level field")]),
    ('{"nnterp_dsl": 1, "graph": [], "graph": []}', [("$.graph", "more than once")]),
    (_doc(5), [("$.graph[0]", "must be an object")]),
    (_doc({}), [("$.graph[0]", 'no "op"')]),
    (_doc({"op": 3}), [("$.graph[0].op", "op must be a string")]),
    (_doc({"op": "raed", "site": "logits"}), [("$.graph[0].op", "did you mean 'read'?")]),
    (_doc({"op": "os.system"}), [("$.graph[0].op", "known ops: read, zero, patch, steer, lens, grad, attention_probs")]),
    (_doc({"op": "Read", "site": "logits"}), [("$.graph[0].op", "unknown op")]),
    (_doc({"op": "read", "site": "logits", "positons": 1}), [("$.graph[0].positons", "did you mean 'positions'?")]),
    ('{"nnterp_dsl":1,"graph":[{"op":"read","site":"logits","op":"zero"}]}', [("$.graph[0].op", "more than once")]),
    (_doc({"op": "read"}), [("$.graph[0]", "missing required field 'site'")]),
    (_doc({"op": "steer"}), [("$.graph[0]", "'layer'"), ("$.graph[0]", "'vector'")]),
    (_doc({"op": "read", "site": "layer[1].output"}), [("$.graph[0].site", "did you mean 'layers[1].output'?")]),
    (_doc({"op": "read", "site": 5}), [("$.graph[0].site", "must be a string")]),
    (_doc({"op": "read", "site": "logits", "positions": [1.0, True]}), [("$.graph[0].positions[0]", "number 1.0"), ("$.graph[0].positions[1]", "boolean true")]),
    (_doc({"op": "read", "site": "logits", "positions": []}), [("$.graph[0].positions", "empty")]),
    (_doc({"op": "read", "site": "logits", "positions": "all"}), [("$.graph[0].positions", "must be an integer")]),
    (_doc({"op": "read", "site": "logits", "steps": -1}), [("$.graph[0].steps", ">= 0")]),
    (_doc({"op": "read", "site": "logits", "steps": "every"}), [("$.graph[0].steps", '"all"')]),
    (_doc({"op": "read", "site": "logits", "name": ""}), [("$.graph[0].name", "empty")]),
    (_doc({"op": "read", "site": "logits", "name": 3}), [("$.graph[0].name", "must be a string")]),
    (_doc({"op": "lens", "name": None}), [("$.graph[0].name", "must be a string")]),
    (_doc({"op": "lens", "top_k": 0}), [("$.graph[0].top_k", ">= 1")]),
    (_doc({"op": "lens", "layers": [True]}), [("$.graph[0].layers[0]", "boolean")]),
    (_doc({"op": "lens", "layers": "some"}), [("$.graph[0].layers", '"all"')]),
    (_doc({"op": "attention_probs", "layer": True}), [("$.graph[0].layer", "boolean true")]),
    (_doc({"op": "attention_probs", "layer": 1.5}), [("$.graph[0].layer", "number 1.5")]),
    (_doc({"op": "grad", "site": "logits", "target": -1}), [("$.graph[0].target", ">= 0")]),
    (_doc({"op": "grad", "site": "logits", "target": 1.0}), [("$.graph[0].target", "token id")]),
    (_doc({"op": "steer", "layer": 0, "vector": TENSOR, "scale": "2"}), [("$.graph[0].scale", "must be a number")]),
    (_doc({"op": "steer", "layer": 0, "vector": TENSOR, "scale": True}), [("$.graph[0].scale", "boolean")]),
    ('{"nnterp_dsl":1,"graph":[{"op":"steer","layer":0,"vector":%s,"scale":NaN}]}' % json.dumps(TENSOR), [("$.graph[0].scale", "finite")]),
    ('{"nnterp_dsl":1,"graph":[{"op":"steer","layer":0,"vector":%s,"scale":-Infinity}]}' % json.dumps(TENSOR), [("$.graph[0].scale", "finite")]),
    ('{"nnterp_dsl":1,"graph":[{"op":"steer","layer":0,"vector":%s,"scale":1e999}]}' % json.dumps(TENSOR), [("$.graph[0].scale", "finite")]),
    (_doc({"op": "steer", "layer": 0, "vector": TENSOR, "scale": 10**400}), [("$.graph[0].scale", "finite")]),
    (_doc({"op": "steer", "layer": 0, "vector": [1.0, 2.0]}), [("$.graph[0].vector", "must be an object")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "dtype": "complex64"}}), [("$.graph[0].vector.dtype", "must be one of")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "dtype": "torch.float32"}}), [("$.graph[0].vector.dtype", "must be one of")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "shape": [-2]}}), [("$.graph[0].vector.shape[0]", ">= 0")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "shape": 2}}), [("$.graph[0].vector.shape", "array")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "shape": [1] * 40}}), [("$.graph[0].vector.shape", "at most 32")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "shape": [3]}}), [("$.graph[0].vector", "needs 12")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "shape": [10**30]}}), [("$.graph[0].vector", "bytes of data")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "data": "not base64!"}}), [("$.graph[0].vector.data", "base64")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "data": "AACAPwAAAMA"}}), [("$.graph[0].vector.data", "base64")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "data": "AACAPwAAAMA=\n"}}), [("$.graph[0].vector.data", "base64")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "data": "ÄÄÄÄ"}}), [("$.graph[0].vector.data", "base64")]),
    (_doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "extra": 1}}), [("$.graph[0].vector.extra", "unknown field")]),
    (_doc({"op": "steer", "layer": 0, "vector": {"dtype": "float32", "shape": [2]}}), [("$.graph[0].vector", "missing required field 'data'")]),
    (_doc({"op": "steer", "layer": 0, "vector": {"dtype": "float32", "shape": [2, 1], "data": TENSOR["data"]}}), [("$.graph[0].vector", "1-D")]),
    (_doc({"op": "steer", "layer": 0, "vector": {"dtype": "int32", "shape": [2], "data": TENSOR["data"]}}), [("$.graph[0].vector", "floating point")]),
    (_doc({"op": "patch", "site": "logits", "value": {"dtype": "bool", "shape": [1], "data": "Ag=="}}), [("$.graph[0].value", "bytes 0 and 1")]),
    (_doc({"op": "patch", "site": "logits"}), [("$.graph[0]", "exactly one of value")]),
    (_doc({"op": "patch", "site": "logits", "value": TENSOR, "source": {"prompt": "p"}}), [("$.graph[0]", "exactly one of value")]),
    (_doc({"op": "patch", "site": "logits", "source": "p"}), [("$.graph[0].source", "must be an object")]),
    (_doc({"op": "patch", "site": "logits", "source": {}}), [("$.graph[0].source", "missing required field 'prompt'")]),
    (_doc({"op": "patch", "site": "logits", "source": {"prompt": ""}}), [("$.graph[0].source.prompt", "empty")]),
    (_doc({"op": "patch", "site": "logits", "source": {"prompt": "p", "site": "x", "position": 1.5, "pos": 1}}), [("$.graph[0].source.pos", "unknown field"), ("$.graph[0].source.site", "malformed site"), ("$.graph[0].source.position", "integer")]),
    (_doc({"op": "read", "site": "logits", "a b": 1}), [('$.graph[0]["a b"]', "unknown field")]),
    ("[" * 100_000 + "]" * 100_000, [("$", "nested too deeply")]),
    ('{"nnterp_dsl": 1, "graph": [' * 50_000, [("$", "")]),
    ("1" * 5000, [("$", "too many digits")]),
    ('{"nnterp_dsl":1,"graph":[{"op":"read","site":"logits","positions":' + "9" * 4400 + "}]}", [("$", "too many digits")]),
    (b"\xff\xfe{}", [("$", "not UTF-8")]),
    (b'{"nnterp_dsl": 1, "graph": [\xc3]}', [("$", "not UTF-8")]),
]


@pytest.mark.parametrize("document, expected", MALFORMED, ids=lambda x: repr(x)[:60] if not isinstance(x, list) else "")
def test_malformed_documents_raise_graph_format_error(document, expected):
    with pytest.raises(GraphFormatError) as info:
        from_json(document)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, NnterpError)
    assert len(err.problems) == len(expected), err.problems
    for (path, message), (want_path, fragment) in zip(err.problems, expected):
        assert path == want_path
        assert fragment in message
    assert len(str(err)) < 5000


def test_all_structural_problems_are_collected_in_order():
    document = _doc(
        {"op": "read", "site": "logits"},
        {"op": "raed"},
        {"op": "steer", "layer": True, "vector": TENSOR, "scale": 1},
        7,
        {"op": "lens", "top_k": "5", "colour": "red"},
    )
    with pytest.raises(GraphFormatError) as info:
        from_json(document)
    assert [path for path, _ in info.value.problems] == [
        "$.graph[1].op",
        "$.graph[2].layer",
        "$.graph[3]",
        "$.graph[4].colour",
        "$.graph[4].top_k",
    ]
    lines = str(info.value).splitlines()
    assert lines[0] == "not a readable nnterp graph document (5 problems):"
    assert lines[1].startswith("1. $.graph[1].op: unknown op")


def test_oversized_documents_are_refused_before_parsing():
    big = " " * (serialize.MAX_DOCUMENT_SIZE + 1)
    with pytest.raises(GraphFormatError, match="longer than"):
        from_json(big)
    with pytest.raises(GraphFormatError, match="larger than"):
        from_json(big.encode())


@pytest.mark.parametrize("value", [None, 5, {"nnterp_dsl": 1, "graph": []}, ["x"], Graph([])])
def test_non_text_input_is_a_graph_format_error(value):
    with pytest.raises(GraphFormatError, match="expected JSON text"):
        from_json(value)


def test_bytes_inputs():
    text = (Lens() >> Read("logits", name="ü")).to_json()
    assert from_json(text.encode()) == from_json(bytearray(text.encode())) == from_json(memoryview(text.encode()))
    assert from_json(b"\xef\xbb\xbf" + text.encode()) == from_json(text)  # a UTF-8 BOM
    raw = '{"nnterp_dsl":1,"graph":[{"op":"read","site":"logits","name":"ü"}]}'.encode()
    assert from_json(raw)[0].name == "ü"


def test_loader_imports_and_runs_nothing_named_in_the_document():
    before = set(sys.modules)
    for document in (
        _doc({"op": "os.system", "site": "logits"}),
        _doc({"op": "read", "site": "logits", "__class__": "subprocess.Popen"}),
        _doc({"op": "steer", "layer": 0, "vector": {**TENSOR, "dtype": "pickle.loads"}}),
        json.dumps({"nnterp_dsl": 1, "graph": [], "py/object": "os.system"}),
    ):
        with pytest.raises(GraphFormatError):
            from_json(document)
    assert set(sys.modules) == before


def test_graph_format_error_pickles():
    err = GraphFormatError([("$.graph[0]", "bad")])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == [("$.graph[0]", "bad")] and str(back) == str(err)


def test_long_problem_lists_are_shortened_in_the_message():
    with pytest.raises(GraphFormatError) as info:
        from_json(_doc(*([5] * 500)))
    assert len(info.value.problems) == 500
    assert "... and 450 more" in str(info.value)


# -- property tests --------------------------------------------------------------------

# Example counts come from the active hypothesis profile (tests/conftest.py): the
# loader's fuzzers, its main guard, run twice the profile's count; the others run it.
FUZZ = settings(
    deadline=None,
    max_examples=2 * settings.default.max_examples,
    suppress_health_check=[HealthCheck.too_slow],
)

KEYS = sorted(
    {"op", "nnterp_dsl", "graph", "dtype", "shape", "data"}
    | {f.name for cls in (*serialize.OPS.values(), Source) for f in attrs.fields(cls)}
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["all", "logits", "layers[1].output", "read", "steer", "float32", "bool", "AAAA", "AACAPwAAAMA="]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=12,
)


def _slots(obj, out):
    """Every (container, key) in a parsed document, to pick a mutation point from."""
    if isinstance(obj, dict):
        for key in obj:
            out.append((obj, key))
            _slots(obj[key], out)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            out.append((obj, i))
            _slots(obj[i], out)
    return out


@st.composite
def mutated_documents(draw, graph_strategy):
    doc = json.loads(draw(graph_strategy).to_json())
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc, [(None, None)])
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "delete", "insert", "wrap"]))
        if container is None:
            doc = draw(json_values) if action == "replace" else {"wrapped": doc}
        elif action == "replace":
            container[key] = draw(json_values)
        elif action == "delete":
            del container[key]
        elif action == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)))] = draw(json_values)
        else:
            container.insert(key, draw(json_values))
    return json.dumps(doc)


def _outcome(text):
    """Graph or GraphFormatError, nothing else; a returned graph must round trip."""
    try:
        graph = from_json(text)
    except GraphFormatError as err:
        assert err.problems
        for path, message in err.problems:
            assert path.startswith("$") and message
        return None
    assert isinstance(graph, Graph)
    assert from_json(graph.to_json()) == graph
    return graph


@settings(deadline=None)
@given(data=st.data())
def test_random_graphs_round_trip(graph_strategy, data):
    g = data.draw(graph_strategy)
    text = g.to_json()
    back = from_json(text)
    assert back == g and hash(back) == hash(g)
    assert back.to_json() == text and back.digest() == g.digest()


@FUZZ
@given(data=st.data())
def test_mutated_documents_give_a_graph_or_graph_format_error(graph_strategy, data):
    _outcome(data.draw(mutated_documents(graph_strategy)))


@FUZZ
@given(data=st.data(), cut=st.floats(0, 1))
def test_truncated_documents(graph_strategy, data, cut):
    text = data.draw(graph_strategy).to_json()
    short = text[: math.floor(len(text) * cut)]
    if short != text:
        with pytest.raises(GraphFormatError):
            from_json(short)


@FUZZ
@given(data=st.data())
def test_documents_with_edited_characters(graph_strategy, data):
    raw = bytearray(data.draw(graph_strategy).to_json().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw)))
        edit = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:0-1.etaf nlruNI\\') + [0x80, 0xFF, 0x00]))
        if edit == "insert" or position == len(raw):
            raw.insert(position, byte)
        elif edit == "set":
            raw[position] = byte
        else:
            del raw[position]
    _outcome(bytes(raw))


@FUZZ
@given(value=json_values)
def test_random_json_values(value):
    _outcome(json.dumps(value))
    _outcome(json.dumps({"nnterp_dsl": 1, "graph": [value]}))
    _outcome(json.dumps({"nnterp_dsl": 1, "graph": [{"op": "patch", "site": "logits", "value": value}]}))


@settings(deadline=None)
@given(text=st.one_of(st.text(), st.binary()))
def test_arbitrary_text_and_bytes(text):
    _outcome(text)
