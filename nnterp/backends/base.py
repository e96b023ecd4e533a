"""What a backend is: the one place that knows how a standardized site maps onto a model.

`StandardizedTransformer` is a facade; every difference between running on Hugging Face
transformers and on vLLM lives in a `Backend` subclass. A backend owns its nnsight model
and implements, for each kind of site (`nnterp.sites.SiteKind`), how to read it and how
to write it inside a trace, how to start traces and generation, how to run a lowered
DSL plan, and how to free its resources. What it cannot do is data, in its `limits`
(`nnterp.backends.limits`), which validation and the facade read.

The DSL reaches a backend through one method: ``execute(plan, prompts, sampling) ->
Execution``, whose argument and result types (`nnterp.dsl.plan`) are plain data that
know nothing of backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nnterp.backends.limits import BackendLimits
from nnterp.sites import SiteKind

if TYPE_CHECKING:
    from nnterp.dsl.plan import Execution, Plan, Sampling

__all__ = ["Backend"]


class Backend:
    """Interface every backend implements. See `nnterp.backends.hf` and `.vllm`."""

    #: what this backend cannot do, and its name (``limits.name``: "hf" or "vllm")
    limits: BackendLimits
    #: the nnsight model (``TransformersModel`` or ``VLLM``)
    model: Any
    #: where the components live (`nnterp.rename.ModulePaths`)
    paths: Any

    @property
    def name(self) -> str:
        return self.limits.name

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def attention_probs_enabled(self) -> bool:
        """Whether attention probabilities can be read (HF: loaded with them)."""
        return False

    def _module_envoy(self, kind: SiteKind, layer: int | None):
        """The nnsight envoy of the module whose output (or input) is the site."""
        from nnterp.rename import resolve_path

        return resolve_path(self.model, self.paths.module_path(kind, layer))

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

    def execute(self, plan: "Plan", prompts: Sequence[str], sampling: "Sampling") -> "Execution":
        """Run a lowered DSL plan on every prompt: the one seam between DSL and backend.

        ``prompts`` are texts; ``run`` passes them as `nnterp.dsl.plan.Prompts`, already
        tokenized, and an executor that feeds the model token ids uses those.
        """
        raise NotImplementedError

    def project_on_vocab(self, hidden: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model's resources; idempotent."""
