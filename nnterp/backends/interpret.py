"""Run the ops of a lowered plan during one forward pass, through a backend's read/write.

This is the body the nnsight-based executors call inside their traces: HF's, in the
thread that nnsight runs beside the model, and vLLM's ``dsl_executor="nnsight"``, inside
the engine's worker (so this module must stay importable there and everything it
receives picklable). It sees activations only through `Backend.read` /
`Backend.write`, in the standardized ``[rows, tokens, width]`` layout: HF gives a
left-padded batch of prompts, vLLM one prompt per invoke. vLLM's default executor does
not come here: `nnterp.backends.batch_program` turns a plan into the per-step tables
its hooks read (`nnterp.backends.vllm_execute` says which serves what). The nnsight path
stays as the reference the batched executor is tested against, op for op, and for
engines where its Python between modules is wanted.

Positions are the prompt's own token indices. In a left-padded HF batch a
non-negative position ``p`` of row ``b`` is column ``pads[b] + p``; a negative one
counts from the end, which padding does not move. At generation steps after the
prompt, a forward pass holds one new token: position ``-1`` (or ``None``) is that
token, and a non-negative position names a prompt token that is not there, so the op
skips that step.

Results go into ``store`` under `nnterp.dsl.plan.OutputKey` keys (name, step, prompt
index, and the layer for a lens) as CPU tensors: ``run`` assembles them into the shapes
it promises. Each kind of operation has its own function, chosen by the op's type.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from nnterp.dsl.plan import (
    AttentionProbsOp,
    GradCaptureOp,
    GradOp,
    LensOp,
    OutputKey,
    PatchOp,
    Plan,
    ReadOp,
    SteerOp,
    ZeroOp,
)
from nnterp.dsl.recorded import Recorder
from nnterp.dsl.steps import reaches_generated_token, wanted_positions
from nnterp.sites import SiteKind

__all__ = ["RunScratch", "run_step", "generation_may_end_early"]


@contextlib.contextmanager
def generation_may_end_early() -> Iterator[None]:
    """Silence nnsight's warning that a step loop was cut short.

    When every prompt ends (end of sequence) before the last step a plan reads, nnsight
    warns that the loop was cut short; the executors expect this and recover the
    generated tokens themselves, so the warning would only alarm the user.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
        yield


def _columns(positions: Any, pad: int, length: int, step: int) -> list[int] | None:
    """Sequence indices of ``positions`` in one row, or ``None`` when none exist this step."""
    if step > 0 or positions is None:
        start = 0 if step > 0 else pad
        if positions is None:
            return list(range(start, length))
        return [length - 1] if reaches_generated_token(positions) else None
    wanted = wanted_positions(positions)
    tokens = length - pad
    outside = [p for p in wanted if not -tokens <= p < tokens]
    if outside:
        raise IndexError(
            f"positions {list(outside)} are outside a prompt of {tokens} tokens "
            f"(valid: {-tokens} .. {tokens - 1}); choose positions every prompt has, e.g. -1"
        )
    return [pad + p if p >= 0 else length + p for p in wanted]


def _store(backend: Any, op: ReadOp | LensOp, step: int, rows: list[int], picked: torch.Tensor,
           store: Any) -> None:
    """Store a read (or its lens) for each row of ``picked`` (``[rows, ..., width]``)."""
    layer = op.layer if isinstance(op, LensOp) else None
    if isinstance(op, ReadOp):
        _record(store, op, layer, step, rows, _keep(picked))
        return
    probs = torch.softmax(backend.project_on_vocab(picked).float(), dim=-1)
    if op.top_k is not None:
        top = probs.topk(op.top_k, dim=-1)
        _record(store, op, layer, step, rows, (_keep(top.values), _keep(top.indices)))
    else:
        _record(store, op, layer, step, rows, _keep(probs))


def _record(store: Any, op: ReadOp | LensOp, layer: int | None, step: int, rows: list[int], batch: Any) -> None:
    """``batch`` (one entry per row, or a pair of such tensors) into ``store``: a
    `Recorder` takes it whole; a dict (nnsight's vLLM executor, one request per row)
    gets one entry per row."""
    if isinstance(store, Recorder):
        store.add_rows(op.name, layer, step, rows, batch, single=isinstance(op.positions, int))
        return
    for b, prompt in enumerate(rows):
        key = OutputKey(op.name, step=step, prompt=prompt, layer=layer)
        store[key] = tuple(t[b] for t in batch) if isinstance(batch, tuple) else batch[b]


def _gather(value: torch.Tensor, columns: list[list[int]]) -> torch.Tensor:
    """``value[b, columns[b]]`` for every row ``b``: ``[rows, k, width]``.

    When every row wants the same contiguous columns (always on vLLM, one row per
    request; on HF for negative positions) this is a slice, a view. Otherwise the index
    is built on the CPU and sent without blocking: a tensor built from a list directly
    on the device would wait for the whole stream at every read.
    """
    first = columns[0]
    # rows of one padding share one list: `is` settles most rows without comparing
    if all(c is first or c == first for c in columns) and first == list(range(first[0], first[0] + len(first))):
        return value[:, first[0]:first[0] + len(first)]
    index = torch.tensor(columns).pin_memory() if value.is_cuda else torch.tensor(columns)
    rows = torch.arange(len(columns))[:, None]
    return value[rows.to(value.device, non_blocking=True), index.to(value.device, non_blocking=True)]


def _select(value: torch.Tensor, row: int, columns: list[int], positions: Any) -> torch.Tensor:
    """One row's selected tokens: ``[width]`` for a single int position, else ``[k, width]``."""
    picked = value[row, columns]
    return picked[0] if isinstance(positions, int) and len(columns) == 1 else picked


def _keep(value: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of a result: vLLM reuses its buffers, and results leave the device.

    The copy is queued on the device's stream (``non_blocking``), so it reads the buffer
    before any later kernel can overwrite it, and the forward pass does not wait for
    it: a blocking copy would stall the model once per read, which is most of the cost
    of a lens or an activation sweep. Executors synchronize once before results are
    read (nnsight's vLLM worker does so before it sends them).
    """
    return value.detach().as_subclass(torch.Tensor).to("cpu", non_blocking=True, copy=True)


class RunScratch:
    """What one run keeps across its steps, by name: each always-on steer's vector,
    moved to the device once (by node index), and each activation captured for a
    gradient until the gradient op takes it (by op name)."""

    __slots__ = ("steer_deltas", "grad_captures")

    def __init__(self) -> None:
        self.steer_deltas: dict[int, torch.Tensor] = {}
        self.grad_captures: dict[str, torch.Tensor] = {}


class _Pass:
    """One forward pass of one batch: what every op function needs besides its op."""

    __slots__ = ("backend", "step", "rows", "pads", "store", "scratch")

    def __init__(self, backend: Any, step: int, rows: list[int], pads: list[int], store: Any,
                 scratch: RunScratch) -> None:
        self.backend, self.step, self.rows, self.pads = backend, step, rows, pads
        self.store, self.scratch = store, scratch

    def read(self, op: Any) -> torch.Tensor:
        # the interpreter never edits a read in place, so it works on a plain tensor: a
        # backend's guarded subclass would route every later op through Python
        value = self.backend.read(op.site.kind, op.site.layer)
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
            value = value.as_subclass(torch.Tensor)
        return value

    def row_pads(self, op: Any) -> list[int]:
        # logits exist only at the last position (where tokens are sampled): no padding
        return [0] * len(self.rows) if op.site.kind is SiteKind.LOGITS else self.pads


def run_step(backend: Any, plan: Plan, step: int, rows: list[int], pads: list[int], store: Any,
             scratch: RunScratch) -> None:
    """Apply every op of ``plan`` active at generation ``step`` to this forward pass.

    Args:
        backend: the `Backend` whose read/write reach the model.
        plan: the lowered `Plan`.
        step: 0 for the prompt's forward pass, k for the k-th token generated after it.
        rows: the prompt index of each batch row.
        pads: the left padding of each batch row.
        store: where results go: a `Recorder` (whole batches), or a dict keyed by
            `OutputKey` (one request at a time, in nnsight's vLLM worker).
        scratch: what the run keeps across its steps (`RunScratch`).
    """
    this = _Pass(backend, step, rows, pads, store, scratch)
    for op in plan.ops_at(step):
        _RUN[type(op)](op, this)


def _run_steer(op: SteerOp, this: _Pass) -> None:
    if op.positions is not None:
        _run_edit(op, this)
        return
    # the common case, at every generated token: one in-place add of a vector moved to
    # the device once, instead of a read, a copy and a write per step
    kind, layer = op.site.kind, op.site.layer
    delta = this.scratch.steer_deltas.get(op.node_index)
    if delta is None:
        like = this.backend.read(kind, layer)
        delta = (op.scale * op.vector.to_tensor()).to(like.device, like.dtype)
        this.scratch.steer_deltas[op.node_index] = delta
    this.backend.add(kind, layer, delta)


def _run_attention_probs(op: AttentionProbsOp, this: _Pass) -> None:
    probs = this.backend.read(SiteKind.ATTENTION_PROBABILITIES, op.site.layer)
    for b, prompt in enumerate(this.rows):
        pad = this.pads[b]
        this.store[OutputKey(op.name, step=this.step, prompt=prompt)] = _keep(probs[b, :, pad:, pad:])


def _run_grad_capture(op: GradCaptureOp, this: _Pass) -> None:
    this.scratch.grad_captures[op.name] = this.read(op)


def _run_read(op: ReadOp | LensOp, this: _Pass) -> None:
    value = this.read(op)
    length = value.shape[-2]
    pads = this.row_pads(op)
    if op.positions is None:  # every token: rows differ in length
        for b, prompt in enumerate(this.rows):
            columns = _columns(None, pads[b], length, this.step)
            _store(this.backend, op, this.step, [prompt], value[b, columns].unsqueeze(0), this.store)
        return
    # Rows of one padding share their columns: work them out once per padding, not once
    # per row (a sweep of 8,192 prompts over 22 layers would make 180,000 calls); the
    # shortest prompt first, since a position it lacks is the one to report.
    by_pad = {pad: _columns(op.positions, pad, length, this.step) for pad in sorted(set(pads), reverse=True)}
    columns = [by_pad[pad] for pad in pads]
    if columns[0] is None:  # a prompt position, at a generation step
        return
    # all rows at once: one gather, one unembedding, one copy off the device
    picked = _gather(value, columns)
    if isinstance(op.positions, int):
        picked = picked[:, 0]
    _store(this.backend, op, this.step, this.rows, picked, this.store)


def _run_edit(op: ZeroOp | PatchOp | SteerOp, this: _Pass) -> None:
    value = this.read(op)
    this.backend.write(op.site.kind, op.site.layer, _edited(op, value, this.step, this.row_pads(op)))


def _edited(op: ZeroOp | PatchOp | SteerOp, value: torch.Tensor, step: int, pads: list[int]) -> torch.Tensor:
    """The activation after a zero, patch or steer."""
    new = value.clone()
    if isinstance(op, SteerOp):
        delta = (op.scale * op.vector.to_tensor()).to(new.device, new.dtype)
        if op.positions is None:
            return new + delta
    elif isinstance(op, ZeroOp) and op.positions is None:
        return torch.zeros_like(new)
    constant = op.value.to_tensor().to(new.device, new.dtype) if isinstance(op, PatchOp) else None
    length = new.shape[-2]
    for b in range(new.shape[0]):
        columns = _columns(op.positions, pads[b], length, step)
        if not columns:
            continue
        if isinstance(op, ZeroOp):
            new[b, columns] = 0
        elif isinstance(op, PatchOp):
            new[b, columns] = constant if constant.ndim == 1 else constant.reshape(len(columns), -1)
        else:
            new[b, columns] = new[b, columns] + delta
    return new


def _run_grad(op: GradOp, this: _Pass) -> None:
    activation = this.scratch.grad_captures.pop(op.name)
    logits = this.backend.read(SiteKind.LOGITS, None)
    log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
    objective = log_probs[:, op.target].sum()  # rows are independent: the sum's gradient splits by row
    with objective.backward():
        gradient = activation.grad
        for b, prompt in enumerate(this.rows):
            columns = _columns(op.positions, this.pads[b], gradient.shape[-2], this.step)
            this.store[OutputKey(op.name, step=this.step, prompt=prompt)] = _keep(
                _select(gradient, b, columns, op.positions))


#: op type -> the function that runs it
_RUN = {
    ReadOp: _run_read,
    LensOp: _run_read,
    ZeroOp: _run_edit,
    PatchOp: _run_edit,
    SteerOp: _run_steer,
    AttentionProbsOp: _run_attention_probs,
    GradCaptureOp: _run_grad_capture,
    GradOp: _run_grad,
}
