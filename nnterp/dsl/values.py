"""Leaf values of the DSL: `TensorValue`, an immutable copy of a tensor.

Nodes must be values: equal and hashable by content, unchanged by anything that happens
after they are built. A `torch.Tensor` is none of these (``==`` returns a tensor, hashing
is by identity, and it can be edited in place behind a frozen wrapper), so every tensor
handed to a node is copied once, at the edge, into a `TensorValue`: the raw bytes, a dtype
name and a shape. Lowering rules call `TensorValue.to_tensor`, which builds a fresh
tensor each time, so a backend's in-place edit never reaches the node.

Bytes rather than a numpy array keep ``bfloat16``, which numpy lacks, and make equality,
hashing and serialization trivially exact.

This module imports attrs and torch only: never nnsight, vllm, transformers, json or the
backends.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

__all__ = ["TensorValue", "DTYPES"]

#: dtype name (as stored in TensorValue and JSON) -> (torch dtype, bytes per element).
#: An allowlist: only dtypes whose bytes mean the same thing on every machine we target.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "bfloat16": (torch.bfloat16, 2),
    "float16": (torch.float16, 2),
    "float32": (torch.float32, 4),
    "float64": (torch.float64, 8),
    "int8": (torch.int8, 1),
    "uint8": (torch.uint8, 1),
    "int16": (torch.int16, 2),
    "int32": (torch.int32, 4),
    "int64": (torch.int64, 8),
    "bool": (torch.bool, 1),
}

#: dtype names whose values are floating point (steering vectors and patch values must be).
FLOAT_DTYPES = frozenset({"bfloat16", "float16", "float32", "float64"})

_BY_TORCH = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def _to_shape(value: Any) -> Any:
    if isinstance(value, (list, torch.Size)):
        return tuple(value)
    return value


def _check_bytes(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bytes):
        raise TypeError(
            f"TensorValue.data must be bytes, got {type(value).__name__}; "
            "build a TensorValue with TensorValue.from_tensor(tensor)",
            attribute,
            bytes,
            value,
        )


def _check_shape(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not all(
        type(d) is int and d >= 0 for d in value
    ):
        raise TypeError(
            f"TensorValue.shape must be a tuple of non-negative ints, got {value!r:.80}",
            attribute,
            tuple,
            value,
        )


def _check_size(instance: "TensorValue", attribute: attrs.Attribute, value: Any) -> None:
    # Runs after data, dtype and shape have each passed their own validator.
    itemsize = DTYPES[instance.dtype][1]
    expected = math.prod(instance.shape) * itemsize
    if len(instance.data) != expected:
        raise ValueError(
            f"TensorValue has {len(instance.data)} bytes of data but shape "
            f"{list(instance.shape)} of {instance.dtype} needs {expected}; "
            "build it with TensorValue.from_tensor(tensor) so data and shape agree"
        )
    if instance.dtype == "bool" and instance.data.translate(None, b"\x00\x01"):
        # torch would read other bytes as an unspecified truth value.
        raise ValueError("TensorValue of dtype bool may only hold the bytes 0 and 1")


@attrs.frozen(repr=False, cache_hash=True)
class TensorValue:
    """An immutable tensor: its bytes, dtype name and shape.

    Equality and hashing compare the bits, not the numbers: a NaN equals a NaN with the
    same bits, and ``-0.0`` differs from ``0.0``. This is what makes a node holding a
    tensor a value, and what makes a graph's JSON digest agree with its equality.

    Args:
        data: the elements in C order, in the machine-independent little-endian layout
            torch uses on every platform nnterp supports.
        dtype: one of `DTYPES` (``"float32"``, ``"bfloat16"``, ...).
        shape: the dimensions; ``()`` is a 0-d tensor.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: ``len(data)`` disagrees with ``shape`` and ``dtype``.

    Example:
        >>> import torch
        >>> t = torch.ones(2, 3)
        >>> v = TensorValue.from_tensor(t)
        >>> v
        TensorValue(float32[2, 3])
        >>> _ = t.zero_()  # the caller's tensor changes; the value does not
        >>> float(v.to_tensor().sum())
        6.0
        >>> v == TensorValue.coerce([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
        True
    """

    data: bytes = attrs.field(converter=_to_bytes, validator=_check_bytes)
    dtype: str = attrs.field(validator=attrs.validators.in_(tuple(DTYPES)))
    shape: tuple[int, ...] = attrs.field(
        converter=_to_shape, validator=[_check_shape, _check_size]
    )

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "TensorValue":
        """Copy a tensor's current contents into a new `TensorValue`.

        Args:
            tensor: any dense tensor of a dtype in `DTYPES`, on any device; gradients
                are detached.

        Raises:
            TypeError: not a tensor, or a dtype outside `DTYPES`.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        name = _BY_TORCH.get(tensor.dtype)
        if name is None:
            raise TypeError(
                f"tensors of dtype {tensor.dtype} cannot be stored in a graph; "
                f"convert it first, e.g. tensor.float() (allowed: {', '.join(DTYPES)})"
            )
        if tensor.layout is not torch.strided:
            tensor = tensor.to_dense()
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel() == 0:
            data = b""
        else:
            data = flat.view(torch.uint8).numpy().tobytes()
        return cls(data, name, tuple(tensor.shape))

    @classmethod
    def coerce(cls, value: Any) -> "TensorValue":
        """Turn what users pass as a tensor argument into a `TensorValue`.

        Accepts a `TensorValue` (returned as is), a `torch.Tensor` (copied), or a
        possibly nested list/tuple of numbers, which becomes float32: the values it
        describes are activations, which are floating point, and ``[1, 2]`` should not
        silently become an integer tensor.

        Raises:
            TypeError: anything else, including lists holding non-numbers.
        """
        if isinstance(value, TensorValue):
            return value
        if isinstance(value, torch.Tensor):
            return cls.from_tensor(value)
        if isinstance(value, (list, tuple)):
            _check_numbers(value)
            try:
                tensor = torch.tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError) as err:
                raise TypeError(
                    f"could not make a tensor from the list ({err}); "
                    "nested lists must be rectangular"
                ) from err
            return cls.from_tensor(tensor)
        raise TypeError(
            f"expected a torch.Tensor, a TensorValue or a list of numbers, got "
            f"{type(value).__name__}"
        )

    def to_tensor(self) -> torch.Tensor:
        """A fresh CPU tensor with these contents; editing it never changes this value."""
        torch_dtype = DTYPES[self.dtype][0]
        if not self.data:
            return torch.empty(self.shape, dtype=torch_dtype)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return raw.view(torch_dtype).reshape(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating_point(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def count_non_finite(self) -> int:
        """How many elements are NaN or infinite (0 for integer and bool dtypes).

        A value may hold them (it is exact data, and JSON round-trips them), but a
        steering vector or patch containing one turns every activation it touches into
        NaN, silently: validation refuses such nodes before they run.
        """
        if not self.is_floating_point or not self.data:
            return 0
        return int((~torch.isfinite(self.to_tensor())).sum())

    def __repr__(self) -> str:
        # The short form keeps Graph.__str__ lines and error messages readable; the
        # numbers themselves are never shown.
        return f"TensorValue({self.dtype}[{', '.join(map(str, self.shape))}])"


def _check_numbers(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise TypeError(
                f"a list given as a tensor may only hold numbers, found "
                f"{type(item).__name__} {item!r:.40}"
            )
