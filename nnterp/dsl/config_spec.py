"""A `ModelSpec` (and a tokenizer) for a model name or path, from its files alone.

``validate(graph, "some/model")`` and ``nnterp validate`` must answer without loading
weights or starting an engine, so they read only the model's configuration through
``transformers.AutoConfig`` (and, to count a run's prompt tokens, its tokenizer). This
is the one place in ``nnterp.dsl``'s validation path that touches transformers, and it
imports it inside the functions, so that importing ``nnterp.dsl`` (and validating
against a loaded model or a `ModelSpec`) never imports it.
"""

from __future__ import annotations

import os
from typing import Any

from nnterp.limits import limits_for
from nnterp.dsl.spec import ModelSpec

__all__ = ["spec_for_name", "tokenizer_for_name"]


def spec_for_name(name: str | os.PathLike, backend: str) -> ModelSpec:
    """Read ``name``'s configuration and describe it for ``backend``.

    ``"bundled"`` means the bundled SmolLM2 (converted on first use). Attention
    probabilities count as enabled where the backend can read them, because ``run``
    loads a model named by string with them when its graph reads them.

    Raises:
        nnterp.errors.ModelNotFoundError: ``name`` is neither a folder nor a hub id.
        OSError: no configuration could be found or read.
        ValueError: the configuration lacks the sizes nnterp needs.
        nnterp.errors.BundledModelError: ``"bundled"`` is not installed.
    """
    from transformers import AutoConfig

    from nnterp.bundled import find_loadable

    config = AutoConfig.from_pretrained(find_loadable(name))
    return ModelSpec.from_config(config, backend,
                                 attention_probs_enabled=limits_for(backend).reads_attention_probabilities)


def tokenizer_for_name(name: str | os.PathLike) -> Any:
    """``name``'s tokenizer (to count a run's prompt tokens before loading weights)."""
    from transformers import AutoTokenizer

    from nnterp.bundled import find_loadable

    return AutoTokenizer.from_pretrained(find_loadable(name))
