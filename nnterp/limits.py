"""What each backend cannot do, declared as data: node types, sites and options.

Validation (`nnterp.dsl.validate`), `nnterp.dsl.ModelSpec` and the facade
(`StandardizedTransformer`) read these tables instead of knowing backends by name: a
graph holding ``Grad`` is refused for vLLM because vLLM's table says so, with the
explanation and the fix written here, once. A backend's class points at its table
(``HFBackend.limits``), and `limits_for` finds one by the name users pass
(``backend="vllm"``).

Limits that depend on an argument's *value* rather than its presence (pipeline
parallelism above 1, CUDA graphs on a machine without a GPU) are checked by the backend
that knows the value; these tables hold what is refused whatever the value.

This module is plain data: it imports attrs and the site vocabulary only, so the DSL
can read it without importing a backend, nnsight or vLLM.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import attrs

from nnterp.sites import SiteKind

__all__ = ["Limit", "BackendLimits", "HF", "VLLM", "BACKENDS", "DEFAULT_BACKEND", "limits_for"]


@attrs.frozen
class Limit:
    """One thing a backend cannot do: why, and what to do instead.

    Args:
        why: the reason, in terms of how the backend works.
        fix: one concrete way to get the same result.
    """

    why: str
    fix: str


def _frozen_mapping(value: Mapping) -> Mapping:
    return MappingProxyType(dict(value))


@attrs.frozen(eq=False)
class BackendLimits:
    """A backend's name, what it is, and what it cannot do.

    Args:
        name: the name users pass (``backend="vllm"``).
        description: what the backend is, for messages.
        nodes: DSL node class name (``"Grad"``) -> why it cannot run, and the fix.
        sites: site kinds it cannot read or write.
        options: keyword arguments of `StandardizedTransformer` it refuses whatever
            their value.
    """

    name: str
    description: str
    nodes: Mapping[str, Limit] = attrs.field(factory=dict, converter=_frozen_mapping)
    sites: Mapping[SiteKind, Limit] = attrs.field(factory=dict, converter=_frozen_mapping)
    options: Mapping[str, Limit] = attrs.field(factory=dict, converter=_frozen_mapping)

    @property
    def reads_attention_probabilities(self) -> bool:
        """Whether a model on this backend can be loaded so that it reads attention
        probabilities (HF, with ``enable_attention_probs=True``)."""
        return SiteKind.ATTENTION_PROBABILITIES not in self.sites


_VLLM_ONLY = "a vLLM engine option"

HF = BackendLimits(
    name="hf",
    description="Hugging Face transformers through nnsight's LanguageModel",
    options={
        "cuda_graphs": Limit(f"{_VLLM_ONLY}; transformers runs eagerly, and every site is served",
                             "load with backend='vllm' to use it, or leave it out"),
        "tensor_parallel_size": Limit(f"{_VLLM_ONLY}; transformers places layers with device_map",
                                      "load with backend='vllm' to use it, or pass device_map='auto'"),
        "nvlink_multicast": Limit(f"{_VLLM_ONLY}; transformers runs no collective across GPUs",
                                  "load with backend='vllm' to use it, or leave it out"),
        "vector_rows": Limit(f"{_VLLM_ONLY}, sizing its batched executor; transformers has no such table",
                             "load with backend='vllm' to use it, or leave it out"),
        "capture_bytes": Limit(f"{_VLLM_ONLY}, sizing its batched executor; transformers has no such buffer",
                               "load with backend='vllm' to use it, or leave it out"),
    },
)

_NO_PROBS = Limit(
    "vLLM's fused attention kernels never materialise attention probabilities",
    "run this graph on the HF backend: StandardizedTransformer(name, backend='hf', "
    "enable_attention_probs=True)",
)

VLLM = BackendLimits(
    name="vllm",
    description="vLLM through nnsight's VLLM",
    nodes={
        "Grad": Limit("vLLM runs inference kernels that keep no autograd graph",
                      "run this graph on the HF backend: StandardizedTransformer(name, backend='hf')"),
        "AttentionProbs": _NO_PROBS,
    },
    sites={SiteKind.ATTENTION_PROBABILITIES: _NO_PROBS},
    options={
        "enable_attention_probs": _NO_PROBS,
        "batch_tokens": Limit("an HF option: vLLM's scheduler forms its own batches of each step "
                              "(max_num_batched_tokens)",
                              "leave it out, or pass max_num_batched_tokens=N to size vLLM's steps"),
    },
)

#: The backend used when none is named.
DEFAULT_BACKEND = "hf"

#: Every backend, by the name users pass.
BACKENDS: Mapping[str, BackendLimits] = MappingProxyType({limits.name: limits for limits in (HF, VLLM)})


def limits_for(name: str) -> BackendLimits:
    """The limits of the backend called ``name``.

    Raises:
        ValueError: no backend has that name; the message lists those that do.
    """
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backend {name!r:.40}; choose one of {', '.join(map(repr, BACKENDS))}"
        ) from None
