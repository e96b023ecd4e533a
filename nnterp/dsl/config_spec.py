"""A `ModelSpec` for a model name or path, from its configuration alone.

``validate(graph, "some/model")`` and ``nnterp validate`` must answer without loading
weights or starting an engine, so they read only the model's configuration through
``transformers.AutoConfig``. This is the one place in ``nnterp.dsl``'s validation path
that touches transformers, and it imports it inside the function, so that importing
``nnterp.dsl`` (and validating against a loaded model or a `ModelSpec`) never imports it.
"""

from __future__ import annotations

import os

from nnterp.dsl.spec import ModelSpec

__all__ = ["spec_for_name"]


def spec_for_name(name: str | os.PathLike, backend: str = "hf") -> ModelSpec:
    """Read ``name``'s configuration and describe it for ``backend``.

    ``"bundled"`` means the bundled SmolLM2 (converted on first use). Attention
    probabilities count as enabled on HF, because ``run`` loads a model named by
    string with them when its graph reads them.

    Raises:
        OSError: no configuration could be found or read.
        ValueError: the configuration lacks the sizes nnterp needs.
        nnterp.errors.BundledModelError: ``"bundled"`` is not installed.
    """
    from transformers import AutoConfig

    from nnterp.bundled import resolve_model_name

    config = AutoConfig.from_pretrained(resolve_model_name(name))
    return ModelSpec.from_config(config, backend, attention_probs_enabled=backend == "hf")
