"""Graph: composition with >>, sequence behaviour, printing, and the DSL's import rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnterp.dsl
from nnterp.dsl import AttentionProbs, Graph, Lens, Read, Steer, Zero

A = Read("layers[0].output")
B = Zero("mlps[1].output")
C = Lens(top_k=3)
D = AttentionProbs(2)


def test_rshift_builds_graphs_in_every_combination():
    assert A >> B == Graph([A, B])
    assert Graph([A]) >> B == Graph([A, B])
    assert A >> Graph([B, C]) == Graph([A, B, C])
    assert Graph([A, B]) >> Graph([C, D]) == Graph([A, B, C, D])
    assert isinstance(A >> B, Graph)


def test_rshift_is_associative():
    assert (A >> B) >> C == A >> (B >> C) == Graph([A, B, C])
    assert ((A >> B) >> C) >> D == A >> (B >> (C >> D)) == (A >> B) >> (C >> D)


@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_rshift_is_associative_on_random_graphs(graph_strategy, data):
    x, y, z = (data.draw(graph_strategy) for _ in range(3))
    assert (x >> y) >> z == x >> (y >> z)
    assert len(x >> y) == len(x) + len(y)
    assert tuple(x >> y) == tuple(x) + tuple(y)


@pytest.mark.parametrize("other", [5, "layers[0].output", None, [B], (B, C), {B}])
def test_non_nodes_on_either_side_of_rshift_are_refused(other):
    for left, right in ((A, other), (other, A), (Graph([A]), other), (other, Graph([A]))):
        with pytest.raises(TypeError) as info:
            left >> right
        message = str(info.value)
        assert "wrap several nodes with Graph([...])" in message
        assert type(other).__name__ in message


def test_graph_constructor():
    assert Graph([A, B]).nodes == (A, B)
    assert Graph((n for n in [A, B])) == Graph([A, B])
    assert Graph(A) == Graph([A])
    assert Graph([A, Graph([B, C])]) == Graph([A, B, C])  # graphs are spliced in
    assert Graph([]) == Graph(()) and len(Graph([])) == 0
    with pytest.raises(TypeError, match=r"nodes\[1\] is of type int"):
        Graph([A, 1])
    with pytest.raises(TypeError):
        Graph("layers[0].output")
    with pytest.raises(TypeError):
        Graph(5)


def test_graph_is_an_immutable_hashable_sequence():
    g = Graph([A, B, C])
    assert len(g) == 3 and list(g) == [A, B, C]
    assert g[0] is A and g[-1] is C
    assert g[1:] == Graph([B, C]) and isinstance(g[1:], Graph)
    with pytest.raises(IndexError):
        g[3]
    with pytest.raises(AttributeError):
        g.nodes = ()
    assert isinstance(g.nodes, tuple)
    assert hash(g) == hash(Graph([A, B, C])) and {g, Graph([A, B, C])} == {g}
    assert Graph([A, B]) != Graph([B, A])
    assert g.output_names == ("layers[0].output", "lens")


def test_str_prints_one_indexed_node_per_line():
    g = Steer(3, [0.0] * 576, scale=2) >> Read("layers[3].output", positions=[0, -1]) >> Lens()
    assert str(g).splitlines() == [
        "[0] Steer(3, TensorValue(float32[576]), scale=2.0)",
        "[1] Read('layers[3].output', positions=(0, -1))",
        "[2] Lens()",
    ]
    assert str(Graph([])) == ""
    assert repr(Graph([A, C])) == "Graph([Read('layers[0].output'), Lens(top_k=3)])"


def test_graph_json_methods_delegate_to_serialize():
    g = A >> Steer(1, [1.0, 2.0]) >> C
    assert Graph.from_json(g.to_json()) == g
    assert g.to_json() == nnterp.dsl.to_json(g)
    assert len(g.digest()) == 64 and g.digest() == Graph.from_json(g.to_json()).digest()


# -- import rules ----------------------------------------------------------------------

DSL = Path(nnterp.dsl.__file__).parent
FORBIDDEN = ("nnsight", "vllm", "transformers", "nnterp.backends", "nnterp.standardized", "json")
PURE = ("values", "sites", "fields", "nodes", "graph", "spec", "validate")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


#: The one backend module the DSL reads: each backend's declared limits, plain data.
ALLOWED = ("nnterp.limits",)


def _forbidden(names: set[str], banned: tuple[str, ...]) -> set[str]:
    return {n for n in names if n not in ALLOWED and any(n == b or n.startswith(b + ".") for b in banned)}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_forbidden(module):
    assert _forbidden(_imports(DSL / f"{module}.py"), FORBIDDEN) == set()


@pytest.mark.parametrize("module", ["serialize", "codec"])
def test_serialize_imports_no_model_machinery(module):
    banned = ("nnsight", "vllm", "nnterp.backends", "nnterp.standardized", "nnterp.dsl.running", "nnterp.dsl.lowering")
    assert _forbidden(_imports(DSL / f"{module}.py"), banned) == set()


def test_building_checking_and_storing_graphs_loads_no_model_library():
    code = (
        "import sys\n"
        "from nnterp.dsl import Graph, Lens, ModelSpec, Read, Steer, validate\n"
        "g = Steer(1, [0.0] * 8) >> Read('layers[1].output') >> Lens(top_k=2)\n"
        "validate(g, ModelSpec(4, 8, 2, 100))\n"
        "assert Graph.from_json(g.to_json()) == g\n"
        "print(' '.join(m for m in ('nnsight', 'vllm', 'transformers', 'nnterp.standardized', "
        "'nnterp.backends.hf', 'nnterp.backends.vllm', 'nnterp.backends.interpret', 'nnterp.dsl.running') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface():
    expected = {
        "Read", "Zero", "Patch", "Source", "Steer", "Lens", "Grad", "AttentionProbs", "Graph",
        "Site", "TensorValue", "ModelSpec", "Problem", "validate", "ValidationError",
        "GraphFormatError", "save", "load", "to_json", "from_json",
        "run", "replay", "Sampling", "RunResult",
        # work bigger than one call (SPEC section 5)
        "run_batch", "Job", "open_results", "ResultsError",
    }  # fmt: skip
    assert set(nnterp.dsl.__all__) == expected
    for name in expected - {"run", "replay", "Sampling", "RunResult", "run_batch", "Job", "open_results"}:
        assert getattr(nnterp.dsl, name) is not None
    with pytest.raises(AttributeError):
        nnterp.dsl.not_a_name
