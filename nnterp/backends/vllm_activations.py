"""Activations read on the vLLM backend: private copies that refuse in-place edits.

vLLM reuses its buffers within a step, and its residual stream is a sum computed on
read, so a value read inside a trace is a copy. An in-place edit of a copy could only be
lost; the contract is that an edit acts or raises, never silently does nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from nnterp.errors import BackendUnsupportedError

__all__ = ["ReadOnlyActivation", "guarded", "plain"]

_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__"}


#: trailing-underscore methods that change no values
_METADATA_ONLY = {"requires_grad_", "share_memory_", "retain_grad", "rename_"}


def _is_inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name in _METADATA_ONLY:
        return False
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__")


class ReadOnlyActivation(torch.Tensor):
    """A private copy of a vLLM activation that refuses in-place edits.

    On the HF backend a value read from an accessor is the live activation, so
    ``model.layers_output[3][:] = 0`` edits the model. vLLM's residual stream is a sum
    computed on read, so an in-place edit of it could only be lost; the contract is
    that such an edit acts or raises, never silently does nothing. Every other
    operation works and returns an ordinary tensor.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_inplace(func) and args and isinstance(args[0], ReadOnlyActivation):
            raise BackendUnsupportedError(
                "in-place edits of activations read on the vLLM backend cannot reach the model "
                "(they are copies: vLLM reuses its buffers). Assign instead, e.g. "
                "model.layers_output[3] = model.layers_output[3] * 0"
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        return result

    def __reduce_ex__(self, protocol):
        # Saved values travel back from the engine's worker; they arrive as plain
        # tensors, which is what a user holds after the trace.
        return torch.Tensor.__reduce_ex__(self.as_subclass(torch.Tensor), protocol)


def guarded(value: torch.Tensor) -> torch.Tensor:
    return value.clone().as_subclass(ReadOnlyActivation)


def plain(value: Any) -> Any:
    if isinstance(value, ReadOnlyActivation):
        return value.as_subclass(torch.Tensor)
    return value
