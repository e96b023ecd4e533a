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


def test_every_module_is_in_a_layer():
    """The package-wide layers contract names every module of nnterp (directly, or as a
    package it belongs to), so a new module cannot slip past the layering."""
    import pkgutil
    import tomllib

    import nnterp

    root = Path(__file__).resolve().parents[1]
    contracts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = contracts[0]["layers"]
    named = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    modules = [info.name for info in pkgutil.walk_packages(nnterp.__path__, "nnterp.")]
    # a package whose modules are layers of their own (nnterp.dsl) is a facade of
    # re-exports; the DSL's forbidden contract and the import test below cover it
    split = {m for m in modules if any(n.startswith(m + ".") for n in named)}
    missing = [m for m in modules if m not in split and not any(m == n or m.startswith(n + ".") for n in named)]
    assert missing == [], f"modules in no layer of {contracts[0]['name']!r}: {missing}"


def test_importing_the_dsl_loads_no_backend():
    """Building, checking and storing graphs needs no backend: a fresh `import nnterp.dsl`
    loads no module of nnterp.backends (import-linter checks imports as written; this
    checks what the interpreter actually loads, package __init__ files included)."""
    code = "import nnterp.dsl, sys; print(sorted(m for m in sys.modules if m.startswith('nnterp.backends')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_run_is_the_function_whichever_import_comes_first():
    """The module that defines ``run`` is ``nnterp.dsl.running``, so importing it binds no
    package attribute ``run`` that would hide the function."""
    code = ("import nnterp.dsl.running; from nnterp.dsl import run, replay, RunResult; "
            "print(callable(run), run.__module__, replay.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "nnterp.dsl.running", "nnterp.dsl.running"]
