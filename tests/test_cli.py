"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_on_hf_prints_paris_then_steers_to_london():
    result = subprocess.run([sys.executable, "-m", "nnterp", "demo", "--backend", "hf"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    last_layer = [line for line in result.stdout.splitlines() if line.strip().startswith("29 ")][0]
    assert "' Paris'" in last_layer and "' London'" in last_layer
    assert "hf greedy:  'The capital of France is' + ' Paris." in result.stdout
    assert "hf steered: 'The capital of France is' + ' London." in result.stdout


def _nnterp(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nnterp", *args], capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_run_writes_results_and_a_readable_heatmap(tmp_path):
    graph = tmp_path / "lens.json"
    graph.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens", "layers": "all", "positions": [0, 1, 2, 3, 4], '
                     '"top_k": 1}]}')
    plot, out = tmp_path / "lens.png", tmp_path / "out"
    result = _nnterp("run", str(graph), "--prompt", "The capital of France is", "--plot", str(plot),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "-> ' Paris'" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    assert (out / "manifest.json").is_file() and (out / "tensors.safetensors").is_file()
    assert "loading 'bundled'" in result.stderr  # progress goes to stderr


def test_validate_reports_every_problem_on_one_line(tmp_path):
    graph = tmp_path / "bad.json"
    graph.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens", "layers": [40]}, {"op": "grad", '
                     '"site": "layers[0].output", "target": 5}]}')
    result = _nnterp("validate", str(graph), "--backend", "vllm")
    _assert_one_line_error(result)
    assert "2 problems" in result.stderr and "nodes[1] Grad" in result.stderr
    ok = tmp_path / "ok.json"
    ok.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens"}]}')
    good = _nnterp("validate", str(ok), "--backend", "vllm")
    assert good.returncode == 0 and "valid for 'bundled'" in good.stdout


def test_bad_input_is_one_line_and_no_traceback(tmp_path):
    truncated = tmp_path / "t.json"
    truncated.write_text('{"nnterp_dsl": 1, "graph": [')
    for args in (("run", str(tmp_path / "missing.json"), "--prompt", "x"),
                 ("run", str(truncated), "--prompt", "x"),
                 ("validate", str(truncated)),
                 ("run", str(truncated), "--prompt", "x", "--model", str(tmp_path / "no-model")),
                 ("run", str(truncated))):
        _assert_one_line_error(_nnterp(*args, timeout=120))
    lens = tmp_path / "lens.json"
    lens.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens"}]}')
    _assert_one_line_error(_nnterp("validate", str(lens), "--model", str(tmp_path / "no-model"), timeout=120))
    _assert_one_line_error(_nnterp("run", str(lens), "--prompt", "x", "--max-tokens", "0", timeout=120))
