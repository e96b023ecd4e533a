"""nnterp: standardized mechanistic-interpretability access to language models, on nnsight.

`StandardizedTransformer` gives one set of names (``layers_output[i]``,
``attentions_output[i]``, ``mlps_output[i]``, ``logits``, ...) over many Hugging Face
architectures, on the Hugging Face backend and on vLLM. ``nnterp.dsl`` builds
declarative intervention graphs on top of it.

Importing nnterp is cheap and silent: torch, transformers, nnsight and vLLM are imported
only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it, imported on first use
_LAZY = {
    "StandardizedTransformer": "nnterp.standardized",
    "ModulePaths": "nnterp.rename",
    "bundled_model_path": "nnterp.bundled",
    "NnterpError": "nnterp.errors",
    "ArchitectureNotSupportedError": "nnterp.errors",
    "BackendUnsupportedError": "nnterp.errors",
    "BundledModelError": "nnterp.errors",
    "PromptTooLongError": "nnterp.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnterp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
