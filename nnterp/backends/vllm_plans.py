"""The plans installed in one vLLM worker, and which of a step's requests belong to which.

A batched call (``run_batch``, ``run([g1, g2, ...])``) installs several plans at once, and
their requests share the engine's batches: one step may hold requests of dozens of
plans, and requests of no plan (a ``model.trace()``, a plain ``generate``). Each request
carries nnterp's tag ``(plan id, prompt row)``; this module turns the tags into per-request
arrays once per change of the batch's requests, so that a step's tables are worked out
with array operations over its tokens, not with a loop over its requests.

Every installed plan gets a *slot*, a small integer that names it in those arrays (-1:
no plan). Slots, and the table of edit vectors that all installed plans share, start
afresh once no plan is installed, so an engine's tables never grow with its age.

It imports neither vLLM nor nnsight: `nnterp.backends.vllm_batch` hands it plain values.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch

from nnterp.backends.batch_program import PlanProgram, VectorTable
from nnterp.dsl.plan import LensOp, Plan

__all__ = ["PlanRun", "BatchView", "InstalledPlans"]


class PlanRun:
    """One installed plan: its program, its requests and what they recorded."""

    def __init__(self, plan: Plan, program: PlanProgram, slot: int) -> None:
        self.plan, self.program, self.slot = plan, program, slot
        #: engine request id -> (prompt index, prompt length)
        self.requests: dict[str, tuple[int, int]] = {}
        #: engine request id -> last step whose logits were recorded
        self.logits_recorded: dict[str, int] = {}
        #: op index -> list of (host copies of values, [prompt, step, order] rows); on a
        #: GPU the copies are in flight until the device is synchronized
        self.values: dict[int, list[tuple[Any, np.ndarray]]] = {}
        #: per plan op: whether it is a lens (the reads it records are projected)
        self.is_lens = np.array([isinstance(op, LensOp) for op in plan.ops], dtype=bool)
        #: the sites whose tables depend on the token (not one constant steer)
        self.computed_sites = [site for site in program.site_ops if program.constant_row(site) is None]
        #: what happened to the plan's requests: steps, chunked prompt passes, preemptions
        self.stats = {"steps": 0, "prompt_chunks": 0, "preemptions": 0}
        #: an event after the last host copies of its values were queued (GPU only)
        self.copied: Any = None
        #: why the plan failed in a step (its reads did not fit), or None
        self.failure: str | None = None

    def keep(self, index: int, value: Any, meta: np.ndarray) -> None:
        self.values.setdefault(index, []).append((value, meta))


@attrs.frozen(eq=False)
class BatchView:
    """Per request of a step, in the runner's order: the slot of its plan (-1: none), its
    prompt row in that plan, its prompt's length and the first position not yet
    recorded (updated in place as the step advances)."""

    ids: list[str]
    slot: np.ndarray
    prompt: np.ndarray
    length: np.ndarray
    recorded: np.ndarray


class InstalledPlans:
    """The plans of one worker, by id and by slot, their requests and shared vectors.

    Args:
        site_index: ``(kind, layer) -> index`` of every hooked site.
        vector_capacity: rows of the device's vector table.
        write_row: ``(row, vector)`` -> None, writes one row of the device's table.
    """

    def __init__(self, site_index: dict, vector_capacity: int, write_row: Callable[[int, torch.Tensor], None]) -> None:
        self.site_index = site_index
        self.vector_capacity = vector_capacity
        self.write_row = write_row
        self.by_id: dict[str, PlanRun] = {}
        self.by_slot: dict[int, PlanRun] = {}
        self.vectors = VectorTable(vector_capacity, write_row)
        #: changes whenever a plan is installed or removed: what the device's tables
        #: hold is named with it, so tables of an earlier set of plans never match
        self.version = 0
        #: engine request id -> (slot, prompt row, prompt length)
        self._owner: dict[str, tuple[int, int, int]] = {}
        #: engine request id -> first position not yet recorded
        self._recorded_to: dict[str, int] = {}
        self._view: BatchView | None = None
        self._constant: dict[int, np.ndarray] | None = None
        self._installs = 0

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def install(self, plan_id: str, plan: Plan) -> PlanRun:
        if plan_id in self.by_id:
            raise RuntimeError(f"nnterp: plan {plan_id} is already installed in this engine")
        slot = max(self.by_slot, default=-1) + 1
        # the vectors' key in the shared table is the install, not the slot: a slot may
        # be taken again while the table still holds its earlier plan's rows
        self._installs += 1
        run = PlanRun(plan, PlanProgram(plan, self.site_index, self.vectors, tag=self._installs), slot)
        self.by_id[plan_id] = self.by_slot[slot] = run
        self._changed()
        return run

    def remove(self, plan_id: str) -> PlanRun:
        run = self.by_id.pop(plan_id, None)
        if run is None:
            raise RuntimeError(f"nnterp: no plan {plan_id} in this engine")
        del self.by_slot[run.slot]
        self._write_back()
        for rid in run.requests:
            self._owner.pop(rid, None)
            self._recorded_to.pop(rid, None)
        self._view = None
        if not self.by_id:  # start afresh: slots from 0, an empty vector table
            self.vectors = VectorTable(self.vector_capacity, self.write_row)
        else:  # its rows go back to the table for the plans to come
            self.vectors.release(run.program.tag)
        self._changed()
        return run

    def _changed(self) -> None:
        self.version += 1
        self._constant = None

    def admit(self, request_id: str, tag: Sequence | None, prompt_length: int) -> None:
        """Note a request the scheduler admitted, if it belongs to an installed plan."""
        run = self.by_id.get(tag[0]) if tag else None
        if run is None:
            return
        prompt = int(tag[1])
        run.requests[request_id] = (prompt, prompt_length)
        self._owner[request_id] = (run.slot, prompt, prompt_length)
        self._recorded_to[request_id] = 0

    def preempted(self, request_ids: Sequence[str]) -> None:
        """Count the preemptions of each plan's requests (they are prefilled again, and
        edited the same way: recording is by position, so nothing is recorded twice)."""
        for rid in request_ids:
            owner = self._owner.get(rid)
            if owner is not None:
                self.by_slot[owner[0]].stats["preemptions"] += 1

    def view(self, ids: list[str]) -> BatchView:
        """The step's requests as arrays. Built once while the batch's requests stay the
        same, as they do through decoding; ``recorded`` is updated in place."""
        if self._view is None or ids != self._view.ids:
            self._write_back()
            info = [self._owner.get(rid, (-1, -1, 0)) for rid in ids]
            table = np.array(info, dtype=np.int64).reshape(len(ids), 3)
            self._view = BatchView(ids, table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(),
                                   np.array([self._recorded_to.get(rid, 0) for rid in ids], dtype=np.int64))
        return self._view

    def _write_back(self) -> None:
        view = self._view
        if view is None:
            return
        for rid, slot, mark in zip(view.ids, view.slot.tolist(), view.recorded.tolist()):
            if slot >= 0 and rid in self._recorded_to:
                self._recorded_to[rid] = mark

    def constant_rows(self) -> dict[int, np.ndarray]:
        """Per site where some plan only steers every token at every step: the vector row
        of each slot there, indexed by ``slot + 1`` (0: no such steer, or no plan). A
        step's rows at that site are one gather of this table by its tokens' slots,
        however many plans share the step."""
        if self._constant is None:
            width = max(self.by_slot, default=-1) + 2
            tables: dict[int, np.ndarray] = {}
            for slot, run in self.by_slot.items():
                for site in run.program.site_ops:
                    row = run.program.constant_row(site)
                    if row is not None:
                        tables.setdefault(site, np.zeros(width, dtype=np.int64))[slot + 1] = row
            self._constant = tables
        return self._constant
