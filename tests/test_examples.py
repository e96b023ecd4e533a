"""The examples folder, as a user runs it: every script exits 0 and prints what its
docstring promises, every graph document loads and fits the bundled model, and the
generator reproduces the committed documents byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nnterp.dsl import AttentionProbs, Grad, Graph, load, validate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "make_examples.py")
DOCUMENTS = sorted(EXAMPLES.glob("*.json"))

#: script -> text its output must contain
EXPECTED = {
    "logit_lens.py": [" 29  ' Paris'"],
    "steering.py": ["clean:   ' Paris", "steered: ' London", "(10, 49152)"],
    "patching.py": ["layer 29 patched  top ' Paris'", "layer 20 clean"],
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, cwd=EXAMPLES.parent)


def test_every_script_and_document_is_covered():
    assert {p.name for p in SCRIPTS} == set(EXPECTED)
    assert {p.stem for p in DOCUMENTS} == {
        "lens", "steer_generation", "activation_patching", "patchscope"}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_and_prints_its_result(script):
    result = _run(str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECTED[script.name]:
        assert text in result.stdout, f"{text!r} not in:\n{result.stdout}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_document_loads_and_fits_the_bundled_model(document):
    graph = load(document)
    assert isinstance(graph, Graph) and len(graph) > 0
    assert Graph.from_json(document.read_text().strip()) == graph
    assert document.read_text() == graph.to_json() + "\n"  # stored in canonical form
    validate(graph, "bundled", backend="hf")
    if not any(isinstance(node, (Grad, AttentionProbs)) for node in graph):
        validate(graph, "bundled", backend="vllm")


def test_generator_reproduces_the_documents_byte_for_byte(tmp_path):
    result = _run(str(EXAMPLES / "make_examples.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == [p.name for p in DOCUMENTS]
    for document in DOCUMENTS:
        assert (tmp_path / document.name).read_bytes() == document.read_bytes(), document.name
