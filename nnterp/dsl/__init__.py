"""nnterp.dsl: declarative intervention graphs, checked before they run.

A graph is an immutable sequence of nodes (`Read`, `Zero`, `Patch`, `Steer`, `Lens`,
`Grad`, `AttentionProbs`) composed with ``>>``. Nodes are values: equal and hashable by
content, serializable to a canonical JSON document, and independent of any backend.
`validate` checks a graph against a model (or just its configuration) and reports every
problem at once; ``run`` validates, lowers the graph to a `nnterp.dsl.plan.Plan` and
hands it to the model's backend (HF or vLLM), which returns an ``Execution``.

``run``, ``replay`` and ``RunResult`` are imported on first use, so
importing ``nnterp.dsl`` to build, check or store graphs never loads the machinery that
runs them.

Example:
    >>> from nnterp.dsl import Graph, Lens, ModelSpec, Read, Steer, validate
    >>> g = Steer(5, [0.1] * 576, scale=8) >> Read("layers[5].output") >> Lens(top_k=5)
    >>> spec = ModelSpec(num_layers=30, hidden_size=576, num_heads=9, vocab_size=49152)
    >>> validate(g, spec) == spec
    True
    >>> Graph.from_json(g.to_json()) == g
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from nnterp.dsl.graph import Graph
from nnterp.dsl.nodes import AttentionProbs, Grad, Lens, Patch, Read, Source, Steer, Zero
from nnterp.dsl.plan import Sampling
from nnterp.dsl.serialize import from_json, load, save, to_json
from nnterp.dsl.sites import Site
from nnterp.dsl.spec import ModelSpec
from nnterp.dsl.validate import Problem, validate
from nnterp.dsl.values import TensorValue
from nnterp.errors import GraphFormatError, ResultsError, ValidationError

#: public name -> module that defines it, imported on first use.
_LAZY = {
    "run": "nnterp.dsl.running",
    "run_batch": "nnterp.dsl.running",
    "Job": "nnterp.dsl.jobs",
    "open_results": "nnterp.dsl.stored",
    "replay": "nnterp.dsl.running",
    "RunResult": "nnterp.dsl.running",
}

__all__ = [
    "Read",
    "Zero",
    "Patch",
    "Source",
    "Steer",
    "Lens",
    "Grad",
    "AttentionProbs",
    "Graph",
    "Site",
    "TensorValue",
    "ModelSpec",
    "Problem",
    "validate",
    "ValidationError",
    "GraphFormatError",
    "ResultsError",
    "save",
    "load",
    "to_json",
    "from_json",
    "Sampling",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnterp.dsl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
