"""Execution backends for nnterp: Hugging Face transformers and vLLM, behind one interface.

`open_backend` is how the facade gets a backend by the name a user passes: it refuses
the options the backend's limits table (`nnterp.limits`) declares it cannot
take, with that table's explanation and fix, then builds the backend. The backend
modules are imported only here and only when chosen: the vLLM one pulls in vLLM.
"""

from __future__ import annotations

from typing import Any

from nnterp.backends.base import Backend
from nnterp.limits import HF, VLLM, limits_for
from nnterp.errors import BackendOptionError

__all__ = ["Backend", "open_backend"]


def open_backend(name: str, path: str, **options: Any) -> Backend:
    """Load the model at ``path`` on the backend called ``name``.

    Args:
        name: ``"hf"`` or ``"vllm"``.
        path: a model folder or hub id.
        **options: `StandardizedTransformer`'s options and the backend's own keyword
            arguments (``paths``, ``enable_attention_probs``, ``dtype``, ...). Options
            that are ``None`` or ``False`` count as not given.

    Raises:
        ValueError: an unknown backend name.
        BackendOptionError: an option this backend does not take.
    """
    limits = limits_for(name)
    for option, limit in limits.options.items():
        if options.get(option) not in (None, False):
            raise BackendOptionError(f"{option} is not available on the {name} backend: "
                                     f"{limit.why}; {limit.fix}")
    options = {key: value for key, value in options.items() if key not in limits.options}
    if limits is HF:
        from nnterp.backends.hf import HFBackend

        return HFBackend(path, **options)
    if limits is VLLM:
        from nnterp.backends.vllm import VLLMBackend

        return VLLMBackend(path, **options)
    raise AssertionError(f"nnterp bug: backend {name!r} has limits but no class")
