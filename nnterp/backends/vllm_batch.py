"""The batch-wide vLLM executor: a whole `Plan` runs inside the engine, on every request.

nnsight's vLLM integration gives each request its own intervention and resumes every
one of them in Python at every step. A DSL plan needs none of that: it is known whole
before the run and is the same for every request. So nnterp's worker runs it the way
the engine runs its own layers, on the flat batch:

1. **Hooks before anything is compiled or captured.** nnterp's model runner (a subclass
   of nnsight's, so the same engine still serves ``model.trace()``) puts one PyTorch
   hook on every hooked site right after ``load_model``, before vLLM's profiling run
   compiles the model or captures CUDA graphs. A hook reads and writes only tensors at
   fixed addresses (`nnterp.backends.vllm_hooks.DeviceState`): per site and token an edit ``x -> a * x + b`` (``b``
   a row of a vector table) and a destination row in a capture buffer. It contains no
   ``.item()``, no ``.cpu()`` and no Python branch on data, so it compiles and replays.
2. **One host-side fill per step.** After vLLM prepares a step's inputs, the runner
   knows each token's request, absolute position and prompt length; the plan's
   `nnterp.backends.batch_program.PlanProgram` turns them into the edit and capture
   tables, which are copied to the device in one copy per table. A chunked prompt and a
   recomputed (preempted) request are handled by position, not by step.
3. **After the forward**, every captured row a read asked for is rebuilt as that read
   saw it, and all lens rows are projected through the final norm and the model's own
   ``compute_logits`` at once (under tensor parallelism every rank takes part in its
   vocabulary gather). Logits are read and edited where the engine computes them, for
   the requests that sample in the step.
4. **Results** leave the device as each step ends (pinned, asynchronous copies), and
   the client collects them at the end of the run as one block per op
   (`nnterp.dsl.recorded.BlockValues`): whole tensors, through shared memory when they
   are large. The generated tokens come from the engine's outputs.

Several plans may be installed at once (``run_batch``, a sweep of graphs): their
requests share the engine's steps, and each token is edited and read by its own plan
(`nnterp.backends.vllm_plans` says which token is whose).

The engine is told which sites to hook through ``additional_config`` (which also enters
vLLM's compile-cache key, so a compiled model is never reused without its hooks).

This module is the per-step engine. It never touches vLLM: the runner that vLLM builds
(`nnterp.backends.internals`) reads the scheduler's batch and hands it over as
plain values (`NewRequest`, `ScheduledStep`); the hooks live in
`nnterp.backends.vllm_hooks` and the results' transport in
`nnterp.backends.vllm_transport`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch

from nnterp.backends.batch_program import HOOKABLE, ReadColumn, TokenBatch
from nnterp.backends.vllm_hooks import DeviceState, Staging, after_module, before_layer
from nnterp.backends.vllm_plans import BatchView, InstalledPlans, PlanRun
from nnterp.backends.vllm_transport import host_empty, ship, to_host, upload
from nnterp.dsl.plan import PatchOp, Plan, ZeroOp
from nnterp.rename import ModulePaths, paths_for, resolve_path
from nnterp.sites import SiteKind

__all__ = ["NewRequest", "ScheduledStep", "StepEngine"]

# -- what the runner hands over ----------------------------------------------------------


@attrs.frozen
class NewRequest:
    """A request the scheduler admitted: its id, nnterp's tag on it (``(plan id, prompt
    row)``, or None for a request of no plan) and its prompt's length."""

    request_id: str
    tag: tuple | None
    prompt_length: int


@attrs.frozen
class ScheduledStep:
    """One step's batch, in the runner's row order: each request's id, the tokens it had
    computed before this step, the tokens it runs in it, and whether its sample is
    discarded (a prompt chunk that does not end its prompt)."""

    request_ids: Sequence[str]
    computed: np.ndarray
    scheduled: np.ndarray
    discarded: np.ndarray


def _token_layout(step: ScheduledStep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each token's request row and absolute position, and one past each request's last
    token of the step, for the step's flat batch of tokens."""
    counts = np.asarray(step.scheduled[: len(step.request_ids)], dtype=np.int64)
    n = int(counts.sum())
    request = np.repeat(np.arange(len(counts)), counts)
    ends = np.cumsum(counts)
    starts = ends - counts
    position = np.asarray(step.computed)[request].astype(np.int64) + (np.arange(n) - starts[request])
    return request, position, ends


# -- the engine ----------------------------------------------------------------------------


class StepEngine:
    """nnterp's state in one worker: the hooked sites, the tables, the installed plans."""

    @classmethod
    def open(cls, model: torch.nn.Module, hf_config: Any, step_tokens: int, config: dict,
             logits_module: torch.nn.Module | None, compute_logits: Callable) -> "StepEngine | None":
        """The executor for ``model``, or None when nnterp cannot map the model: the
        client then refuses it with the list of what is missing, and the engine shuts
        down cleanly instead of failing to start.

        Args:
            model: the engine's model (vLLM's module tree).
            hf_config: its Hugging Face configuration.
            step_tokens: the most tokens one step holds.
            config: the ``additional_config`` entry (`executor_config`).
            logits_module: the module whose output is a step's logits (hooked to read
                and edit them), or None.
            compute_logits: hidden rows -> logits, as the engine computes them.
        """
        from nnterp.rename import missing_paths

        paths = (ModulePaths(**config["paths"]) if config.get("paths")
                 else paths_for(getattr(hf_config, "model_type", "?"), model))
        if paths is None or missing_paths(model, paths):
            return None
        return cls(model, hf_config, step_tokens, config, paths, logits_module, compute_logits)

    def __init__(self, model: torch.nn.Module, hf_config: Any, step_tokens: int, config: dict,
                 paths: ModulePaths, logits_module: torch.nn.Module | None, compute_logits: Callable) -> None:
        self.model = model
        self.unembed = compute_logits
        self.paths = paths
        kinds = [SiteKind(name) for name in config["sites"]]
        layers = resolve_path(model, self.paths.layers)
        self.sites: list[tuple[SiteKind, int | None]] = []
        for kind in sorted(kinds, key=HOOKABLE.index):
            self.sites += [(kind, layer) for layer in range(len(layers))] if kind.per_layer else [(kind, None)]
        self.site_index = {site: i for i, site in enumerate(self.sites)}
        parameter = next(model.parameters())
        text_config = getattr(hf_config, "text_config", hf_config)
        hidden = int(text_config.hidden_size)
        #: the unembedding's width, to size the lens's slices
        self.vocab_size = int(text_config.vocab_size)
        tokens = int(step_tokens) + 64  # room for the padding vLLM appends
        itemsize = torch.empty((), dtype=parameter.dtype).element_size()
        capacity = max(tokens, int(config["capture_bytes"]) // (hidden * itemsize))
        self.state = DeviceState(len(self.sites), tokens, hidden, int(config["vector_rows"]), capacity,
                                  parameter.dtype, parameter.device, bool(config["eager"]))
        multiplier = (resolve_path(model, self.paths.embeddings_multiplier)
                      if getattr(self.paths, "embeddings_multiplier", None) else None)
        for index, (kind, layer) in enumerate(self.sites):
            # a layer's input and output are two sites of one module: the site is bound
            # to the hook, the tables are the module's (shared) buffers
            module = resolve_path(model, self.paths.module_path(kind, layer))
            module.nnterp_state = self.state
            if kind is SiteKind.LAYERS_INPUT:
                module.register_forward_pre_hook(functools.partial(before_layer, index), with_kwargs=True)
            else:
                scaled = multiplier if kind is SiteKind.EMBEDDINGS_OUTPUT else None
                module.register_forward_hook(functools.partial(after_module, index, scaled))
        self.final_norm = resolve_path(model, self.paths.final_norm) if self.paths.final_norm else None
        if logits_module is not None:
            logits_module.register_forward_hook(self._on_logits)
        self.projecting = False

        #: vector rows written by installs, not yet on the device (`_upload_rows`)
        self.pending_rows: dict[int, torch.Tensor] = {}

        def write_row(row: int, vector: torch.Tensor) -> None:
            self.pending_rows[row] = vector.to(self.state.vector.dtype, copy=True)

        self.plans = InstalledPlans(self.site_index, self.state.vector.shape[0], write_row)
        self.dirty: set[int] = set()
        #: this step's read tables, per plan (rows of `Capture.reads`, capture rows made global)
        self.step_reads: list[tuple[PlanRun, np.ndarray]] = []
        #: this step's logits actions: (plan, logits row, prompt index, step, [(op index, op)])
        self.sampling: list[tuple[PlanRun, int, int, int, list]] = []
        n_sites, n_tokens = len(self.sites), tokens
        pin = parameter.device.type == "cuda"
        self.dump = capacity + torch.arange(n_tokens)
        # two staging sets, used in turn: the host fills one while the copy from the
        # other may still be in flight, so a step never waits for the previous one
        self.stages = [Staging(n_sites, n_tokens, self.dump, pin) for _ in range(2 if pin else 1)]
        self.turn = 0
        #: what the device's tables hold, as a `Staging.held` of every touched site, or
        #: None when that cannot be named: equal contents need no copy
        self.device_holds: dict[int, tuple] | None = {}

    # -- plans ---------------------------------------------------------------------------

    def install(self, plan_id: str, plan: Plan) -> None:
        """Install a plan beside any already installed: their requests share the steps."""
        self.plans.install(plan_id, plan)

    def admit(self, new_requests: Sequence[NewRequest], preempted: Sequence[str]) -> None:
        """Note the requests of installed plans that the scheduler admitted, and count
        those it preempted."""
        if not self.plans:
            return
        self.plans.preempted(preempted)
        for new in new_requests:
            self.plans.admit(new.request_id, new.tag, new.prompt_length)

    # -- one step ------------------------------------------------------------------------

    def fill(self, step: ScheduledStep) -> None:
        """Work out this step's tables on the host and copy them to the device."""
        self.step_reads, self.sampling = [], []
        if not self.plans and not self.dirty:
            if self.pending_rows:  # a plan installed and gone before any step
                self._upload_rows()
            return  # nothing installed, and the tables are already neutral
        stage = self._take_stage()
        touched: set[int] = set()
        if self.plans:
            ids = list(step.request_ids)
            request, position, ends = _token_layout(step)
            view = self.plans.view(ids)
            slot = view.slot[request]
            if (slot >= 0).any():
                tokens = TokenBatch(view.prompt[request], position, view.length[request])
                touched = self._write_sites(stage, slot, tokens, view.recorded[request])
                self._advance(view, step.discarded, position[ends - 1] + 1)
        for site in stage.dirty - touched:  # back to neutral
            stage.neutral(site, self.dump)
        for site in touched | self.dirty:
            self.state.active[site] = site in touched
        if self.pending_rows:  # written by installs, and by this step's first use of a row
            self._upload_rows()
        self._copy_tables(stage, touched)
        stage.dirty = touched
        self.dirty = touched

    def _upload_rows(self) -> None:
        """Put the vector rows written since the last step (by installs, and by this
        step's first use of a composed row) on the device, in one copy queued before this
        step's forward pass.

        Nothing writes the device row by row: an install arrives between steps (a server
        installs a plan per steered request, while other requests run), and a copy from
        pageable host memory first waits for every kernel already queued, a whole step,
        while the host could not prepare the next one. Queued here, in stream order, the
        rows land after the steps that may still read a row's earlier content (a row
        given back by a removed plan) and before the first step that uses them."""
        rows = sorted(self.pending_rows)
        vectors = torch.stack([self.pending_rows[row] for row in rows])
        self.pending_rows = {}
        device = self.state.vector.device
        self.state.vector.index_copy_(0, upload(np.array(rows, dtype=np.int64), device),
                                      vectors.to(device) if device.type != "cuda"
                                      else vectors.pin_memory().to(device, non_blocking=True))

    def _take_stage(self) -> "Staging":
        """The staging set to fill this step, once its copy of two steps ago has left it."""
        stage = self.stages[self.turn]
        self.turn = (self.turn + 1) % len(self.stages)
        if stage.copied is not None:
            stage.copied.synchronize()
        return stage

    def _write_sites(self, stage: Staging, slot: np.ndarray, tokens: TokenBatch, recorded: np.ndarray) -> set[int]:
        """Write each site's edit and capture rows of this step into ``stage``, and note
        its reads; the sites touched. ``slot``: each token's plan (-1: none).

        A site where plans only steer every token (a steering sweep: every plan, every
        step) is one gather of `InstalledPlans.constant_rows` by the tokens' slots, and
        is not rewritten while the step's tokens and plans stay the same. Other sites
        are worked out plan by plan, each plan writing only its own tokens.
        """
        plans, n = self.plans, len(slot)
        fresh = tokens.position >= recorded
        present = [plans.by_slot[s] for s in np.unique(slot[slot >= 0]).tolist()]
        computed = [(run, run.computed_sites) for run in present if run.computed_sites]
        mixed = {site for _, sites in computed for site in sites}
        # site -> (a, vector row) of every token, for the sites rewritten this step
        tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        touched: set[int] = set()
        holds = None
        for site, rows_by_slot in plans.constant_rows().items():
            rows = rows_by_slot[slot + 1]
            if not rows.any():
                continue
            touched.add(site)
            if site in mixed:
                tables[site] = (np.ones(n, dtype=np.float32), rows)
                continue
            holds = holds or (plans.version, n, slot.tobytes())
            if stage.held.get(site) != holds:
                stage.neutral(site, self.dump)
                stage.row[site, :n] = torch.from_numpy(rows)
                stage.held[site] = holds
        captures: list[tuple[int, np.ndarray, int]] = []
        used = 0
        for run, sites in computed:
            mine = slot == run.slot
            own = TokenBatch(np.where(mine, tokens.prompt, -1), tokens.position, tokens.prompt_length)
            for site, result in run.program.step(own, fresh, sites):
                if result is None:
                    continue
                scale, rows, capture = result
                if site in tables:  # another plan's tokens are here too: keep theirs
                    before = tables[site]
                    scale, rows = np.where(mine, scale, before[0]), np.where(mine, rows, before[1])
                tables[site] = (scale, rows)
                touched.add(site)
                if capture is not None and run.failure is None:
                    k = len(capture.tokens)
                    if used + k > self.state.capacity:
                        # this plan fails (at its collect), not the step: the engine and
                        # the step's other plans go on. Its edits still apply, so its
                        # requests run to their end as they would have.
                        run.failure = (
                            f"nnterp: one step reads {used + k} rows, more than the capture buffer's "
                            f"{self.state.capacity}; load the model with a larger one, "
                            f"StandardizedTransformer(..., backend='vllm', capture_bytes=N), or run fewer "
                            f"prompts or reads at once")
                        continue
                    captures.append((site, capture.tokens, used))
                    reads = capture.reads.copy()
                    reads[:, ReadColumn.CAPTURE] += used
                    self.step_reads.append((run, reads))
                    used += k
        for site, (scale, rows) in tables.items():
            stage.neutral(site, self.dump)
            stage.scale[site, :n] = torch.from_numpy(scale)
            stage.row[site, :n] = torch.from_numpy(rows)
        for site, captured, first in captures:
            stage.dest[site, torch.from_numpy(captured)] = torch.arange(first, first + len(captured))
        return touched

    def _advance(self, view: BatchView, discard: np.ndarray, reached: np.ndarray) -> None:
        """Count the step for each plan in it, move each request's high-water mark to
        ``reached`` (the position after its last token of this step), and note the
        logits actions of the requests that sample in it."""
        plans = self.plans
        ours = view.slot >= 0
        present = np.unique(view.slot[ours])
        for s in present.tolist():
            plans.by_slot[s].stats["steps"] += 1
        # a prompt pass that ends before its prompt does
        chunked = np.bincount(view.slot[ours & (reached < view.length)] + 1, minlength=1)
        for s in np.flatnonzero(chunked[1:]).tolist():
            plans.by_slot[s].stats["prompt_chunks"] += int(chunked[s + 1])
        np.maximum(view.recorded, np.where(ours, reached, 0), out=view.recorded)
        for s in present.tolist():
            run = plans.by_slot[s]
            if not run.program.logit_ops:
                continue
            for row in np.flatnonzero((view.slot == s) & ~np.asarray(discard[: len(view.ids)], dtype=bool)).tolist():
                rid = view.ids[row]
                prompt_row, prompt_length = run.requests[rid]
                last = int(reached[row]) - 1
                step = max(0, last - prompt_length + 1)
                if run.logits_recorded.get(rid, -1) < step:
                    run.logits_recorded[rid] = step
                    actions = run.program.logit_actions(prompt_length, last)
                    if actions:
                        self.sampling.append((run, row, prompt_row, step, actions))

    def _copy_tables(self, stage: Staging, touched: set[int]) -> None:
        """Copy the staged tables to the device, whole (a few MB; the device never sees a
        stale row), unless the device holds the same already (steady decoding)."""
        nameable = all(site in stage.held for site in touched)
        holds = {site: stage.held[site] for site in touched} if nameable else None
        if holds is not None and holds == self.device_holds:
            return
        if touched or self.dirty:
            state = self.state
            state.scale.copy_(stage.scale, non_blocking=True)
            state.row.copy_(stage.row, non_blocking=True)
            state.dest.copy_(stage.dest, non_blocking=True)
            if stage.copied is not None:
                stage.copied.record()
        self.device_holds = holds

    def after_forward(self) -> None:
        """Rebuild this step's reads from the captured rows, project the lens rows, and
        start their copy to the host (pinned, asynchronous on a GPU: it overlaps the
        next step, and the device never holds more than a step of results)."""
        if not self.step_reads:
            return
        entries, self.step_reads = self.step_reads, []
        try:
            self._rebuild_reads(entries)
        finally:
            self._copies_queued(run for run, _ in entries)

    def _copies_queued(self, runs: Any) -> None:
        """Mark the step's host copies of ``runs``' values: `collect` waits for them,
        and for nothing else the device has queued."""
        if not self.state.captured.is_cuda:
            return  # copies to a CPU are done when they return
        event = torch.cuda.Event()
        event.record()
        for run in runs:
            run.copied = event

    def _rebuild_reads(self, entries: list[tuple[PlanRun, np.ndarray]]) -> None:
        table = np.concatenate([reads for _, reads in entries])
        device = self.state.captured.device
        # capture row, a, vector row: one upload (float64 holds the indices exactly)
        rebuild = upload(np.ascontiguousarray(table[:, ReadColumn.CAPTURE:ReadColumn.VECTOR_ROW + 1]), device)
        rows, vector_rows = rebuild[:, 0].long(), rebuild[:, 2].long()
        scale = rebuild[:, 1].to(self.state.captured.dtype)
        seen = self.state.captured[rows] * scale[:, None] + self.state.vector[vector_rows]
        ops = table[:, ReadColumn.OP].astype(np.int64)
        meta = table[:, ReadColumn.PROMPT:ReadColumn.ORDER + 1].astype(np.int64)  # prompt, step, order
        # each entry is one plan's reads at one site, listed op by op: an op's rows are
        # one contiguous run of the table
        entry = np.repeat(np.arange(len(entries)), [len(reads) for _, reads in entries])
        bounds = np.flatnonzero(np.r_[True, (ops[1:] != ops[:-1]) | (entry[1:] != entry[:-1]), True]).tolist()
        groups = [(entries[int(entry[start])][0], int(ops[start]), start, stop)
                  for start, stop in zip(bounds[:-1], bounds[1:])]
        lens = np.concatenate([run.is_lens[reads[:, ReadColumn.OP].astype(np.int64)] for run, reads in entries])
        if not lens.all():
            host = to_host(seen)
            for run, index, start, stop in groups:
                if not lens[start]:
                    run.keep(index, host[start:stop], meta[start:stop])
        if lens.any():
            # each lens's rows are projected with the others of its top_k only: plans
            # sharing a step may ask for the full distribution and for a top 5
            by_top_k: dict[Any, list[tuple[PlanRun, int, int, int]]] = {}
            for run, index, start, stop in groups:
                if lens[start]:
                    by_top_k.setdefault(run.plan.ops[index].top_k, []).append((run, index, start, stop))
            for top_k, members in by_top_k.items():
                rows = np.concatenate([np.arange(start, stop) for _, _, start, stop in members])
                whole = len(rows) == len(seen)
                part = self._lens(seen if whole else seen[upload(rows, device)], top_k)
                first = 0
                for run, index, start, stop in members:
                    cut = slice(first, first + stop - start)
                    first += stop - start
                    run.keep(index, tuple(t[cut] for t in part) if isinstance(part, tuple) else part[cut],
                             meta[start:stop])

    def _lens(self, rows: torch.Tensor, top_k: int | None) -> Any:
        """Host copies of the probabilities (or their top ``top_k``) of ``rows``. The rows
        are projected a slice at a time, so that a step's probabilities never take more
        than about `_PROBS_BYTES` of device memory."""
        n = rows.shape[0]
        chunk = max(1, _PROBS_BYTES // (4 * self.vocab_size))
        out: Any = None
        for start in range(0, n, chunk):
            probs = torch.softmax(self._project(rows[start:start + chunk]).float(), dim=-1)
            part = probs if top_k is None else tuple(probs.topk(top_k, dim=-1))
            if out is None:  # every slice has the same width: allocate the host copy once
                out = tuple(host_empty((n, *t.shape[1:]), t) for t in part) if top_k is not None \
                    else host_empty((n, *part.shape[1:]), part)
            if top_k is not None:
                for host, value in zip(out, part):
                    host[start:start + len(value)].copy_(value, non_blocking=True)
            else:
                out[start:start + len(part)].copy_(part, non_blocking=True)
        return out

    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        x = rows
        if self.final_norm is not None:
            x = self.final_norm(x)
            x = x[0] if isinstance(x, tuple) else x
        self.projecting = True
        try:
            return self.unembed(x)
        finally:
            self.projecting = False

    def _on_logits(self, module: Any, args: Any, logits: Any) -> Any:
        if self.projecting or not self.sampling or logits is None:
            return None
        edited, copied = False, []
        for run, row, prompt_row, step, actions in self.sampling:
            for index, op in actions:
                if isinstance(op, (ZeroOp, PatchOp)):
                    if not edited:  # the engine's tensor: edit a copy, returned as the output
                        logits, edited = logits.clone(), True
                    logits[row] = 0 if isinstance(op, ZeroOp) else \
                        op.value.to_tensor().reshape(-1, logits.shape[-1])[0].to(logits)
                else:
                    run.keep(index, to_host(logits[row:row + 1].float().clone()),
                             np.array([[prompt_row, step, 0]]))
                    copied.append(run)
        self.sampling = []
        if copied:
            self._copies_queued(copied)
        return logits if edited else None

    # -- results -------------------------------------------------------------------------

    def collect(self, plan_id: str, reports: bool = True) -> bytes | None:
        """Every value one plan recorded, as one block per op: rows sorted by (prompt,
        step, order), with their ``[prompt, step, order]`` table. Whole tensors, not one
        object per prompt: a sweep of thousands of prompts and dozens of layers would
        otherwise pickle hundreds of thousands of small tensors
        (`nnterp.backends.vllm_transport`). The plan is uninstalled. ``reports``:
        whether this worker replies (under tensor parallelism every rank holds the same
        values, and rank 0 replies)."""
        run = self.plans.remove(plan_id)
        if run.copied is not None:
            # its host copies have landed. Only those: a server collects a plan per
            # request while others run, and a device-wide wait would stall their steps
            run.copied.synchronize()
        if not reports:
            return None
        if run.failure is not None:
            return ship({}, run.stats, failure=run.failure)
        return ship(run.values, run.stats)


#: Device memory one slice of a lens's probabilities may take (float32, rows x vocabulary).
_PROBS_BYTES = 1 << 30
