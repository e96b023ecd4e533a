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
