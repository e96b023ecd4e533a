"""A `Plan` as per-token tables: what the batch-wide vLLM executor computes on the host.

vLLM runs many requests in one flat batch of tokens, and splits, pauses and recomputes
them as its scheduler sees fit: a prompt may arrive in several chunks, a preempted
request is prefilled again from position 0. The batch-wide executor therefore never
thinks in steps of a trace. For every token of a step it knows the request, the
token's absolute position ``p`` in its sequence and the prompt's length ``P``; the
generation step follows (``0`` for ``p < P``, else ``p - P + 1``), and from those three
numbers alone this module decides, for each hooked site:

* the **edit**: every `ZeroOp`, `PatchOp` and `SteerOp` at a site is an affine map of
  the residual stream, ``x -> a * x + b`` with ``a`` in ``{0, 1}``, and so is their
  composition in graph order. A token's composition is ``(a, row)``, where ``row`` names
  the vector ``b`` in a table of vectors that the device holds; equal compositions share
  a row. Because the edit depends only on ``(plan, p, P)``, a recomputed token is edited
  exactly as it was the first time.
* the **reads**: a token a `ReadOp` or `LensOp` wants is captured once per site, before
  the site's edits, and each read records the composition of the edits that precede it
  in graph order, so the value it saw is rebuilt as ``a * raw + b``. A token is recorded
  only at positions past the request's high-water mark, so a recomputed or re-chunked
  token is never recorded twice.

Logits are not a module output in vLLM; `logit_actions` gives their edits and reads for
a request that samples in this step.

This module is host-side arithmetic on numpy arrays and CPU tensors. It imports neither
vLLM nor nnsight, so it is tested without an engine.
"""

from __future__ import annotations

import enum
from typing import Any, Iterator

import attrs
import numpy as np
import torch

from nnterp.dsl.plan import LensOp, PatchOp, Plan, ReadOp, SteerOp, ZeroOp
from nnterp.dsl.steps import acts_at_each, reaches_generated_token, wanted_positions
from nnterp.sites import SiteKind

__all__ = ["PlanProgram", "TokenBatch", "Capture", "ReadColumn", "VectorTable", "HOOKABLE"]

#: The site kinds the executor hooks: every module site (logits are handled apart).
HOOKABLE = tuple(kind for kind in SiteKind if kind.in_dsl and kind is not SiteKind.LOGITS)

_EDITS = (ZeroOp, PatchOp, SteerOp)
#: reset codes of a token's composition: none, a zero; a patch row is op * _ROW_SPAN + row
_NO_RESET, _ZERO = -1, -2
_ROW_SPAN = 1 << 32
_READS = (ReadOp, LensOp)


@attrs.frozen
class TokenBatch:
    """The tokens of one step, flat, in vLLM's batch order.

    Args:
        prompt: the plan's prompt index of each token's request (-1: not this plan's).
        position: each token's absolute position in its sequence.
        prompt_length: the prompt length of each token's request.
    """

    prompt: np.ndarray
    position: np.ndarray
    prompt_length: np.ndarray

    @property
    def step(self) -> np.ndarray:
        """0 for a prompt token, k for the token fed at generation step k."""
        return np.where(self.position < self.prompt_length, 0, self.position - self.prompt_length + 1)


def position_matches(positions: Any, tokens: TokenBatch) -> Iterator[tuple[int, np.ndarray]]:
    """``(order, mask)`` for each requested position: which tokens it names.

    ``order`` is the position's index in the op's list (its row in the result); for
    ``positions=None`` one ``(-1, mask)`` names every prompt token, whose row is its own
    position. In a generation step's pass only the new token exists: ``None`` and
    ``-1`` name it; any other position names no token there.
    """
    prompt = tokens.position < tokens.prompt_length
    wanted = wanted_positions(positions)
    if wanted is None:
        yield -1, np.ones(prompt.shape, dtype=bool)
        return
    generated_ok = reaches_generated_token(positions)
    for order, p in enumerate(wanted):
        target = p if p >= 0 else tokens.prompt_length + p
        mask = prompt & (tokens.position == target)
        if generated_ok:
            mask |= ~prompt
        yield order, mask


class VectorTable:
    """The vectors ``b`` of the edits, one row each, as the device's table holds them.

    Row 0 is the zero vector (no edit, or a zero). A composition is keyed by the reset
    that starts it (a patch row, or none) and the steers added after it; its vector is
    computed once on the host and written to the device table when first used.
    """

    def __init__(self, capacity: int, write_row: Any) -> None:
        self.capacity = capacity
        self._write_row = write_row
        self._rows: dict[tuple, int] = {}
        #: rows given back by removed plans, taken again first
        self._free: list[int] = []

    def row(self, key: tuple, vector: Any) -> int:
        found = self._rows.get(key)
        if found is not None:
            return found
        if self._free:
            found = self._free.pop()
        elif len(self._rows) + 1 >= self.capacity:
            raise OverflowError(
                f"the edits of the plans installed together need more than {self.capacity} distinct vectors; "
                f"load the model with a larger table, StandardizedTransformer(..., backend='vllm', "
                f"vector_rows=N)")
        else:
            found = len(self._rows) + 1
        self._rows[key] = found
        self._write_row(found, vector())
        return found

    def release(self, tag: Any) -> None:
        """Give back the rows of the plan whose keys start with ``tag``: a server's plans
        come and go while others stay installed, and the table must not fill up with
        the rows of plans long gone."""
        for key in [key for key in self._rows if key[0] == tag]:
            self._free.append(self._rows.pop(key))


class ReadColumn(enum.IntEnum):
    """The columns of `Capture.reads`: one row per read of a captured token."""

    OP = 0  #: the op's index in the plan
    PROMPT = 1  #: the prompt's row in the run
    STEP = 2  #: the generation step
    ORDER = 3  #: the row in the op's result (its position's index, or the position)
    POSITION = 4  #: the token's absolute position
    CAPTURE = 5  #: the token's index in `Capture.tokens` (a capture row, once placed)
    SCALE = 6  #: ``a`` of the edit ``a * x + vector[row]`` that rebuilds what the read saw
    VECTOR_ROW = 7  #: its vector row


@attrs.frozen
class Capture:
    """What one step records at one site: raw rows to capture, and the reads of them.

    Args:
        tokens: indices (into the step's flat batch) of the tokens captured raw.
        reads: one row per read of a captured token, float64 (which holds the indices
            exactly), its columns named by `ReadColumn`.
    """

    tokens: np.ndarray
    reads: np.ndarray


class PlanProgram:
    """One plan's rules, per hooked site, and the per-step tables they give.

    Args:
        plan: the lowered plan.
        site_index: ``(kind, layer) -> index`` of every hooked site.
        vectors: the `VectorTable`, which several plans may share.
        tag: names this plan's vectors in a shared table (the plan's slot).
    """

    def __init__(self, plan: Plan, site_index: dict[tuple[SiteKind, int | None], int],
                 vectors: VectorTable, tag: int = 0) -> None:
        self.plan = plan
        self.vectors = vectors
        self.tag = tag
        #: hooked site index -> the plan's ops there, in graph (plan) order
        self.site_ops: dict[int, list[tuple[int, Any]]] = {}
        #: ops at the logits, in order
        self.logit_ops: list[tuple[int, Any]] = []
        for index, op in enumerate(plan.ops):
            if not isinstance(op, _EDITS + _READS):
                raise NotImplementedError(f"the batch executor does not run {type(op).__name__}")
            kind = op.site.kind
            if kind is SiteKind.LOGITS:
                self.logit_ops.append((index, op))
                continue
            key = (kind, op.site.layer if kind.per_layer else None)
            if key not in site_index:
                raise KeyError(key)
            self.site_ops.setdefault(site_index[key], []).append((index, op))
        self._tensors: dict[int, torch.Tensor] = {}
        self._constant: dict[int, int | None] = {}
        #: per site whose ops all read: their positions and steps. Sites with equal keys
        #: capture the same tokens in every step (a sweep reads one position at every
        #: layer), so a step works out one of them and renames the others' ops.
        self._read_keys = {site: tuple((op.positions, op.steps) for _, op in ops)
                           for site, ops in self.site_ops.items() if all(isinstance(op, _READS) for _, op in ops)}

    def _value(self, index: int, op: Any) -> torch.Tensor:
        cached = self._tensors.get(index)
        if cached is None:
            if isinstance(op, SteerOp):
                cached = op.scale * op.vector.to_tensor().float()
            else:
                value = op.value.to_tensor().float()
                cached = value.reshape(-1, value.shape[-1])
            self._tensors[index] = cached
        return cached

    def _constant_steer(self, site: int, ops: list[tuple[int, Any]]) -> int | None:
        """The vector row when every op at ``site`` steers every token of every step."""
        if site not in self._constant:
            steer_ops = [index for index, op in ops]
            everywhere = all(isinstance(op, SteerOp) and op.positions is None and op.steps == "all"
                             for _, op in ops)
            self._constant[site] = self._edits(np.array([_NO_RESET]), np.array([(1 << len(ops)) - 1]),
                                               steer_ops)[1][0] if everywhere else None
        return self._constant[site]

    def _vector(self, reset: int, bits: int, steer_ops: list[int]) -> Any:
        def vector() -> torch.Tensor:
            total = None
            if reset >= 0:
                op_index, row = divmod(reset, _ROW_SPAN)
                total = self._value(op_index, self.plan.ops[op_index])[row].clone()
            for bit, op_index in enumerate(steer_ops):
                if bits >> bit & 1:
                    add = self._value(op_index, self.plan.ops[op_index])
                    total = add.clone() if total is None else total + add
            return total

        return vector

    def _edits(self, reset: np.ndarray, bits: np.ndarray, steer_ops: list[int]
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(a, vector row)`` of each composition ``(reset, steer bits)``."""
        scale = np.where(reset == _NO_RESET, 1.0, 0.0).astype(np.float32)
        rows = np.zeros(len(reset), dtype=np.int64)
        edited = (reset != _NO_RESET) | (bits != 0)
        if edited.any():
            pairs = np.stack([reset[edited], bits[edited]], axis=1)
            unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
            found = np.array([
                self.vectors.row((self.tag, int(r), int(b), tuple(steer_ops)), self._vector(int(r), int(b), steer_ops))
                if (r != _ZERO or b != 0) else 0
                for r, b in unique], dtype=np.int64)
            rows[edited] = found[inverse.reshape(-1)]
        return scale, rows

    def constant_row(self, site: int) -> int | None:
        """The vector row when every op at ``site`` steers every token at every step:
        its tables are then ``a = 1`` and this row for each of the plan's tokens."""
        ops = self.site_ops.get(site)
        return self._constant_steer(site, ops) if ops else None

    def step(self, tokens: TokenBatch, fresh: np.ndarray, sites: Any = None
             ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, Capture | None] | None]]:
        """`site_step` of each site in ``sites`` (default: every site with ops), with one
        computation per group of read-only sites that read alike."""
        shared: dict[tuple, tuple[list[int], Any]] = {}
        for site in self.site_ops if sites is None else sites:
            key = self._read_keys.get(site)
            if key is not None and key in shared:
                template, result = shared[key]
                yield site, _renamed(result, template, [index for index, _ in self.site_ops[site]])
                continue
            result = self.site_step(site, tokens, fresh)
            if key is not None:
                shared[key] = ([index for index, _ in self.site_ops[site]], result)
            yield site, result

    def site_step(self, site: int, tokens: TokenBatch, fresh: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, Capture | None] | None:
        """The edit ``(a, vector row)`` of every token at ``site``, and what to capture.

        Returns None when the plan does nothing at ``site`` this step. ``fresh`` marks
        the tokens past their request's high-water mark, the only ones recorded.
        """
        ops = self.site_ops.get(site)
        if not ops:
            return None
        mine = tokens.prompt >= 0
        constant = self._constant_steer(site, ops)
        if constant is not None:  # the common case, at every step: no per-token work
            return np.ones(len(mine), dtype=np.float32), np.where(mine, constant, 0), None
        step = tokens.step
        n = len(mine)
        steer_ops = [index for index, op in ops if isinstance(op, SteerOp)]
        # the running composition of each token: the reset that starts it (none, a
        # zero, or a patch row, encoded as op * _ROW_SPAN + row) and the steers since
        reset = np.full(n, _NO_RESET, dtype=np.int64)
        bits = np.zeros(n, dtype=np.int64)
        reads: list[np.ndarray] = []
        captured = np.zeros(n, dtype=bool)
        for index, op in ops:
            active = mine & acts_at_each(op.steps, step)
            if not active.any():
                continue
            for order, mask in position_matches(op.positions, tokens):
                hit = np.flatnonzero(active & mask)
                if isinstance(op, _READS):
                    hit = hit[fresh[hit]]
                    if len(hit):
                        a, rows = self._edits(reset[hit], bits[hit], steer_ops)
                        where = tokens.position[hit] if order < 0 else np.full(len(hit), order)
                        # the columns of ReadColumn, in order
                        reads.append(np.stack([np.full(len(hit), index), tokens.prompt[hit], step[hit], where,
                                               tokens.position[hit], hit, a, rows], axis=1).astype(np.float64))
                        captured[hit] = True
                elif isinstance(op, SteerOp):
                    bits[hit] |= 1 << steer_ops.index(index)
                elif isinstance(op, ZeroOp):
                    reset[hit], bits[hit] = _ZERO, 0
                else:
                    one_row = self._value(index, op).shape[0] == 1
                    row = 0 if one_row else (order if order >= 0 else tokens.position[hit])
                    reset[hit], bits[hit] = index * _ROW_SPAN + row, 0
        scale, rows = self._edits(reset, bits, steer_ops)
        capture = None
        if reads:
            table = np.concatenate(reads)
            tokens_captured = np.flatnonzero(captured)
            where = np.full(n, -1, dtype=np.int64)
            where[tokens_captured] = np.arange(len(tokens_captured))
            table[:, ReadColumn.CAPTURE] = where[table[:, ReadColumn.CAPTURE].astype(np.int64)]
            capture = Capture(tokens_captured, table)
        return scale, rows, capture

    def logit_actions(self, prompt_length: int, last_position: int) -> list[tuple[int, Any]]:
        """The logits ops acting when a request samples after ``last_position``."""
        step = max(0, last_position - prompt_length + 1)
        return [(index, op) for index, op in self.logit_ops if acts_at_each(op.steps, np.array(step))]


def _renamed(result: Any, template: list[int], ops: list[int]) -> Any:
    """A read-only site's step result for another site whose ops read alike: the same
    tables, with each read's op index (column 0) mapped from ``template`` to ``ops``."""
    if result is None or result[2] is None:
        return result
    scale, rows, capture = result
    lookup = np.zeros(max(template) + 1, dtype=np.float64)
    lookup[template] = ops
    reads = capture.reads.copy()
    reads[:, ReadColumn.OP] = lookup[reads[:, ReadColumn.OP].astype(np.int64)]
    return scale, rows, Capture(capture.tokens, reads)
