"""The examples in the docstrings of every ``nnterp.dsl`` module, and of ``nnterp.rename``
and ``nnterp.backends.weights``, run and print what they say.

STYLE.md asks every public DSL name for an example that runs with no model loaded; this
runs them with the rest of the suite, one test per module, so a changed repr or message
shows up as a failure of the module whose example went stale.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import nnterp.dsl

MODULES = ["nnterp.dsl"] + sorted(
    info.name for info in pkgutil.walk_packages(nnterp.dsl.__path__, prefix="nnterp.dsl.")) + [
    "nnterp.rename", "nnterp.weight_map", "nnterp.backends.weights"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    failed = 0
    for test in doctest.DocTestFinder().find(module, name):
        failed += runner.run(test, out=report.write).failed
    if failed:
        pytest.fail(f"{failed} docstring example(s) of {name} failed:\n{report.getvalue()}", pytrace=False)
