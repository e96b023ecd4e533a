"""The package's layering (pyproject's import-linter contracts) holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_import_contracts_are_kept():
    root = Path(__file__).resolve().parents[1]
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([command], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert ", 0 broken." in result.stdout


def _loaded_after(statement: str) -> str:
    code = (f"{statement}; import sys; "
            "print(sorted(m for m in ('torch', 'nnsight', 'vllm', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # silent: no logging set-up, no warnings, no prints
    return result.stdout.strip()


def test_importing_nnterp_is_silent_and_light():
    assert _loaded_after("import nnterp") == "[]"
    # graphs hold tensors (torch), but building and checking them loads no model machinery
    assert _loaded_after("import nnterp.dsl") == "['torch']"
