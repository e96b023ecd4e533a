"""What a backend is: the one place that knows how a standardized site maps onto a model.

`StandardizedTransformer` is a facade; every difference between running on Hugging Face
transformers and on vLLM lives in a `Backend` subclass. A backend owns its nnsight model
and implements, for each kind of site (`nnterp.sites.SiteKind`), how to read it and how
to write it inside a trace, how to start traces and generation, how to run a lowered
DSL plan, how to read a weight by its standardized name, and how to free its resources.
What it cannot do is data, in its `limits` (`nnterp.limits`), which validation
and the facade read.

The DSL reaches a backend through ``execute(plan, prompts, sampling) -> Execution``, and
``execute_many`` for several plans at once, whose argument and result types
(`nnterp.dsl.plan`) are plain data that know nothing of backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nnterp.limits import BackendLimits
from nnterp.sites import SiteKind

if TYPE_CHECKING:
    from nnterp.dsl.plan import Plan, Sampling
    from nnterp.dsl.recorded import Execution

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

    @property
    def max_model_len(self) -> int | None:
        """The most tokens, prompt and generated, one sequence may hold, where the backend
        enforces a limit (a vLLM engine's ``max_model_len``); None where it does not."""
        return None

    @property
    def served_sites(self) -> frozenset[SiteKind] | None:
        """The site kinds plans may touch (a CUDA-graph engine's hooked sites), or None
        for every site."""
        return None

    @property
    def vector_rows(self) -> int | None:
        """Rows of the executor's table of edit vectors, where it has one."""
        return None

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

    def execute_many(self, jobs: Sequence[tuple["Plan", Sequence[str], "Sampling"]]) -> list["Execution"]:
        """Run several plans, each on its own prompts: one `Execution` per job, each what
        ``execute`` gives for it alone. A backend that can share work across plans (vLLM's
        batched executor: one batch of requests) overrides this loop."""
        return [self.execute(plan, prompts, sampling) for plan, prompts, sampling in jobs]

    def project_on_vocab(self, hidden: Any) -> Any:
        raise NotImplementedError

    # -- weights -------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "?")

    def weight_names(self) -> list[str]:
        """The standardized names of this model's weights, in forward order (see
        `nnterp.weight_map.weight_refs`): those whose module and tensor this backend's model has."""
        from nnterp.weight_map import weight_refs

        return [ref.name for ref in weight_refs(self.paths, self.model_type, self.num_layers)
                if self._locate_weight(ref) is not None]

    def weight(self, name: str) -> Any:
        """The weight called ``name``, in Hugging Face's layout, as a tensor of its own
        (see ``StandardizedTransformer.weight``).

        Raises:
            ValueError: a name this model has no weight for; the message suggests the
                closest name and lists the valid ones.
            IndexError: a layer index out of range.
            NotImplementedError: a per-layer weight of a family nnterp does not map.
        """
        from nnterp.weight_map import unknown_weight_message, weight_ref

        if not isinstance(name, str):
            raise TypeError(f"weight(...) takes a weight name (str), got {type(name).__name__}")
        ref = weight_ref(name, self.paths, self.model_type, self.num_layers)
        where = None if ref is None else self._locate_weight(ref)
        if where is None:
            raise ValueError(unknown_weight_message(name, self.weight_names(), self.model_type))
        return self._read_weight(ref, where)

    def _locate_weight(self, ref: Any) -> Any:
        """Where this backend's model keeps a `nnterp.weight_map.WeightRef`, in whatever form
        `_read_weight` takes; None when the model has no such tensor."""
        raise NotImplementedError

    def _read_weight(self, ref: Any, where: Any) -> Any:
        """The tensor at ``where`` (from `_locate_weight`), as a copy in Hugging Face's layout."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model's resources; idempotent."""
