"""What a backend is: the one place that knows how a standardized site maps onto a model.

`StandardizedTransformer` is a facade; every difference between running on Hugging Face
transformers and on vLLM lives in a `Backend` subclass. A backend owns its nnsight model
and implements, for each standardized site, how to read it and how to write it inside a
trace, plus how to start traces and generation and how to free its resources.

Sites are named by `SiteKind` members, so a backend is a small table of read and write
rules rather than a set of properties; the facade's accessors (`layers_output[i]`, ...)
are thin views that call `read` and `write`.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["SiteKind", "Backend", "SAMPLING_KEYS"]

#: Sampling settings both backends accept on ``trace``/``generate``; vLLM turns them
#: into ``SamplingParams``, HF into ``generate`` arguments.
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed")


class SiteKind(enum.Enum):
    """A kind of standardized activation; per-layer kinds take a layer index."""

    EMBEDDINGS_OUTPUT = "embeddings_output"
    LAYERS_INPUT = "layers_input"
    LAYERS_OUTPUT = "layers_output"
    ATTENTIONS_OUTPUT = "attentions_output"
    MLPS_OUTPUT = "mlps_output"
    ATTENTION_PROBABILITIES = "attention_probabilities"
    LOGITS = "logits"

    @property
    def per_layer(self) -> bool:
        return self not in (SiteKind.EMBEDDINGS_OUTPUT, SiteKind.LOGITS)


class Backend:
    """Interface every backend implements. See `nnterp.backends.hf` and `.vllm`."""

    #: "hf" or "vllm"
    name: str
    #: the nnsight model (``TransformersModel`` or ``VLLM``)
    model: Any

    #: where the components live (`nnterp.rename.ModulePaths`)
    paths: Any

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def _module_envoy(self, kind: SiteKind, layer: int | None):
        """The nnsight envoy of the module whose output (or input) is the site."""
        from nnterp.rename import resolve_path

        if kind is SiteKind.EMBEDDINGS_OUTPUT:
            return resolve_path(self.model, self.paths.embeddings)
        block = resolve_path(self.model, self.paths.layers)[layer]
        if kind is SiteKind.ATTENTIONS_OUTPUT:
            return resolve_path(block, self.paths.attention)
        if kind is SiteKind.MLPS_OUTPUT:
            return resolve_path(block, self.paths.mlp)
        return block

    def read(self, kind: SiteKind, layer: int | None) -> Any:
        """The activation at a site, inside a trace, in the standardized layout."""
        raise NotImplementedError

    def write(self, kind: SiteKind, layer: int | None, value: Any) -> None:
        """Replace the activation at a site with ``value`` for the rest of the model."""
        raise NotImplementedError

    def add(self, kind: SiteKind, layer: int | None, delta: Any) -> None:
        """Add ``delta`` (broadcast over rows and tokens) to a site. Backends with a
        cheaper in-place way override this."""
        self.write(kind, layer, self.read(kind, layer) + delta)

    def trace(self, *inputs: Any, **kwargs: Any):
        raise NotImplementedError

    def generate(self, *inputs: Any, **kwargs: Any):
        raise NotImplementedError

    def project_on_vocab(self, hidden: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model's resources; idempotent."""
