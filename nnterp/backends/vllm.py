"""The vLLM backend: standardized sites over nnsight's ``VLLM``, on GPU or CPU.

Three facts about vLLM shape this module.

1. **The residual stream is split.** vLLM's Llama-family decoder layers return
   ``(hidden, residual)`` and fuse the residual addition into the next layer's norm, so
   the residual stream after layer ``i`` is ``hidden + residual``; ``hidden`` alone is
   wrong by a wide margin. Reads present the sum. Writes hand the model
   ``(value, zeros)``: the next fused norm computes ``value + 0``, which is exactly
   ``value``, so the model carries on from precisely the written stream. Layers that
   return a single tensor (GPT-2) are read and written as they are.
2. **Activations are flat and live.** Each request's tokens arrive as ``[tokens,
   hidden]`` (one prompt per invoke; ``[1, tokens, hidden]`` from a family vLLM runs
   through its generic transformers back end, such as GPT-NeoX on vLLM 0.32), and
   vLLM's fused kernels overwrite buffers in place later in the step. Reads therefore
   return private copies shaped like the HF backend's (``[1, tokens, hidden]``),
   guarded so that an in-place edit of one raises instead of silently doing nothing
   (assign to the accessor to write).
3. **The intervention code runs in the engine's worker.** nnsight ships the body of a
   ``with model.trace(...)`` block to the worker, so everything the accessors touch
   must be picklable and importable there (this module is).

Logits exist only where vLLM samples: the last position of each request. The
``logits`` accessor returns ``[1, 1, vocab]`` per request, so ``logits[:, -1]`` means the
same on both backends.

DSL plans do not go through nnsight by default: `VLLMBackend.execute` hands them to the
batch-wide executor of `nnterp.backends.vllm_batch`, whose hooks nnterp's worker installs
in every engine (and compiles into the model with ``cuda_graphs``). nnsight's per-request
path stays for ``dsl_executor="nnsight"``, and for every ``trace``.

Weights, likewise, live in the engine: this process's copy of the model (nnsight's
module tree, on the meta device) has their shapes only. ``weight`` asks every worker for
its share over vLLM's RPC and puts the shares together (`nnterp.backends.weights`), and
the copy's parameters refuse to compute, pointing there.

On a machine without CUDA the engine runs on vLLM's CPU backend through
`nnterp.backends.vllm_cpu`. vLLM itself is imported only inside functions.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from nnterp.backends.base import Backend
from nnterp.backends.batch_program import HOOKABLE
from nnterp.backends.internals import engine_class, torch_module, unembed
from nnterp.backends.load_check import PROBE_TEXT, check_sites, warn_untested
from nnterp.backends.vllm_activations import ReadOnlyActivation, guarded, plain
from nnterp.backends.vllm_execute import execute_batched_many, execute_nnsight
from nnterp.backends.vllm_lifecycle import classes_unchanged, closed, cpu_max_model_len, hf_model_classes, opened
from nnterp.backends.vllm_settings import (engine_environment, float32_engine_environment, graph_site_kinds,
                                           without_multicast)
from nnterp.backends.vllm_tracer import check_prompt_length, flatten_prompts, too_long, tracer_class
from nnterp.backends.weights import HeadLayout, assemble, guard_meta_parameters, local_pieces, locate, unpack
from nnterp.dsl.plan import Plan, Prompts, Sampling
from nnterp.dsl.recorded import Execution
from nnterp.errors import ArchitectureNotSupportedError, BackendUnsupportedError, PromptTooLongError
from nnterp.limits import VLLM as VLLM_LIMITS
from nnterp.rename import KNOWN_ARCHITECTURES, ModulePaths, mapping_error_message, missing_paths, paths_for, resolve_path
from nnterp.sites import SiteKind

__all__ = ["VLLMBackend", "ReadOnlyActivation"]


class VLLMBackend(Backend):
    """Standardized sites on an nnsight ``VLLM`` engine, with two executors for plans.

    ``execute`` runs a DSL plan batch-wide inside the engine
    (`nnterp.backends.vllm_batch`): one set of hooks for every request, no per-request
    Python. nnsight's executor (one intervention per request) remains for
    ``dsl_executor="nnsight"``; traces (``trace``/``generate``) are nnsight's.

    Args:
        name_or_path: a Hugging Face model folder or hub id.
        paths: where the components live, for a family nnterp does not know.
        cuda_graphs: ``False`` (default) runs the engine eagerly, where every site is
            served to plans and to nnsight traces. ``True``, or a list of site names
            (``"layers_output"``, ``"mlps_output"``, ...), compiles the model and replays
            CUDA graphs as vanilla vLLM does, with nnterp's hooks on those sites
            (``True``: ``layers_output``) compiled in; ``run`` serves only those sites,
            and nnsight traces are refused (they need an eager engine). A GPU is needed.
        dsl_executor: ``"batched"`` (default) or ``"nnsight"``: which executor runs
            plans on an eager engine.
        nvlink_multicast: ``True`` (default) leaves vLLM's choices alone. ``False`` keeps
            a GPU engine off NVLink multicast, for hosts where it is switched off or must
            not be used: vLLM 0.26 at ``tensor_parallel_size > 1`` otherwise picks a
            multicast all-reduce (see `nnterp.backends.vllm_settings`). No effect on CPU.
        check: run the load check of the sites (`nnterp.backends.load_check`) for a
            family nnterp guessed or the user's own ``paths``.
        vector_rows: rows of the batched executor's table of edit vectors: how many
            distinct steering and patch vectors (and their compositions) one plan may use.
        capture_bytes: the batched executor's capture buffer: how many activation rows
            one engine step may read (at least one step's tokens).
        **kwargs: engine arguments (``dtype``, ``max_model_len``,
            ``tensor_parallel_size``, ``gpu_memory_utilization``, ...). On CPU, defaults
            from `nnterp.backends.vllm_cpu.cpu_engine_kwargs` fill what is not given.
    """

    limits = VLLM_LIMITS

    def __init__(self, name_or_path: str, *, paths: ModulePaths | None = None, cuda_graphs: Any = False,
                 dsl_executor: str = "batched", nvlink_multicast: bool = True, quiet: bool = False,
                 check: bool = True, vector_rows: int = 256, capture_bytes: int = 256 * 1024 * 1024,
                 **kwargs: Any) -> None:
        # nnsight refuses vLLM's V2 model runner; make the default explicit so a user's
        # environment cannot pick it.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from nnterp.backends import vllm_cpu
        from nnterp.backends.vllm_settings import CONFIG_KEY, executor_config

        self.graph_kinds = graph_site_kinds(cuda_graphs)
        if dsl_executor not in ("batched", "nnsight"):
            raise ValueError(f"dsl_executor must be 'batched' or 'nnsight', got {dsl_executor!r}")
        if dsl_executor == "nnsight" and self.graph_kinds is not None:
            raise BackendUnsupportedError(
                "dsl_executor='nnsight' needs an eager engine (nnsight's interventions run in Python "
                "between modules); drop cuda_graphs, or use the batched executor")
        self.dsl_executor = dsl_executor
        self._vector_rows = int(vector_rows)
        if "enforce_eager" in kwargs:
            raise TypeError("enforce_eager is set by nnterp: pass cuda_graphs=True (or site names) to "
                            "replay CUDA graphs, or leave it out for an eager engine")

        if int(kwargs.get("pipeline_parallel_size") or 1) > 1:
            raise BackendUnsupportedError(
                "pipeline parallelism is not supported: each rank would hold only some of the "
                "layers, so a graph could not read or write the others. Split the model with "
                "tensor_parallel_size=N instead (every rank then sees every layer)")
        if isinstance(kwargs.get("dtype"), torch.dtype):
            kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
        eager = self.graph_kinds is None
        kwargs["additional_config"] = {
            **(kwargs.get("additional_config") or {}),
            CONFIG_KEY: executor_config(HOOKABLE if eager else tuple(sorted(self.graph_kinds, key=HOOKABLE.index)),
                                        paths, eager, vector_rows=self._vector_rows, capture_bytes=int(capture_bytes)),
        }
        engine_cls = engine_class()
        cpu = vllm_cpu.is_cpu_only()
        environment = float32_engine_environment(kwargs.get("dtype"), cpu)
        if quiet:
            # vLLM's log lines and bars, in this process and in the engine's, which inherit
            # the environment while they start (`nnterp.quiet`)
            from nnterp.quiet import quiet_environment, quiet_libraries

            environment.update(quiet_environment())
        if not nvlink_multicast and not cpu:
            kwargs, no_multicast = without_multicast(kwargs)
            environment.update(no_multicast)
        if cpu and not eager:
            raise BackendUnsupportedError(
                "cuda_graphs needs a GPU: vLLM's CPU backend runs eagerly (every site is served "
                "there anyway); leave cuda_graphs out")
        with classes_unchanged(hf_model_classes(name_or_path, kwargs.get("trust_remote_code", False))), \
                engine_environment(environment if quiet else {}):
            if quiet:
                quiet_libraries()  # this process's loggers, with the quiet environment set
            if cpu:
                if "max_model_len" not in kwargs:
                    kwargs["max_model_len"] = cpu_max_model_len(name_or_path)
                self.model = vllm_cpu.load_cpu_vllm(name_or_path, engine_cls=engine_cls, **kwargs)
            else:
                kwargs.setdefault("enable_prefix_caching", False)
                self.model = engine_cls(name_or_path, dispatch=False, **kwargs)
                self.model.compiled = not eager
        self._closed = False
        opened(self)
        root = torch_module(self.model)
        model_type = getattr(self.model.config, "model_type", "?")
        self.paths = paths if paths is not None else paths_for(model_type, root)
        problems = missing_paths(root, self.paths)
        if problems:
            self.close()
            raise ArchitectureNotSupportedError(mapping_error_message(model_type, type(root).__name__, problems))
        self._num_layers = len(resolve_path(root, self.paths.layers))
        if not self.model.dispatched:
            # the engine's processes start here, and take their environment with them
            with engine_environment(environment):
                self.model.dispatch()
        # This process's copy of the model has shapes and no values: computing with one
        # of its weights raises an error that points to `weight` (nnterp.backends.weights).
        guard_meta_parameters(torch_module(self.model))
        untested = paths is None and model_type not in KNOWN_ARCHITECTURES
        if check and (untested or paths is not None):
            self._check_sites(model_type, type(root).__name__)
        if untested:
            warn_untested(model_type, check)

    def _check_sites(self, model_type: str, class_name: str) -> None:
        """The load check of `nnterp.backends.load_check`, for mappings the parity suite
        does not cover: a family nnterp guessed, or the user's own ``ModulePaths``. It
        costs one short trace, which a CUDA-graph engine cannot run."""
        if self.graph_kinds is not None:
            self.close()
            raise BackendUnsupportedError(
                f"model_type {model_type!r} is not one nnterp was tested on, and its sites are checked at "
                f"load with a trace, which a cuda_graphs engine cannot run: load it once without "
                f"cuda_graphs (the check then runs), and pass check=False with cuda_graphs after that")
        try:
            check_sites(self, self.trace, model_type=model_type, class_name=class_name,
                        hidden=int(self.model.config.hidden_size),
                        n_tokens=len(self.model.tokenizer(PROBE_TEXT)["input_ids"]),
                        vocab=None, logits_every_position=False)
        except BaseException:
            self.close()
            raise

    # -- description -----------------------------------------------------------------

    @property
    def max_model_len(self) -> int | None:
        # vLLM stops a sequence at this length without a word, whatever max_tokens says
        llm = self.model.vllm_entrypoint
        return None if llm is None else int(llm.llm_engine.model_config.max_model_len)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    # -- reading and writing ---------------------------------------------------------

    @property
    def served_sites(self) -> frozenset[SiteKind] | None:
        return self.graph_kinds if self.graph_kinds is None else self.graph_kinds | {SiteKind.LOGITS}

    @property
    def vector_rows(self) -> int | None:
        return self._vector_rows if self.dsl_executor == "batched" else None

    def served(self, kind: SiteKind) -> bool:
        """Whether this engine serves ``kind`` (a CUDA-graph engine serves only its hooked sites)."""
        if kind in self.limits.sites:
            return False
        return kind is SiteKind.LOGITS or self.graph_kinds is None or kind in self.graph_kinds

    def _require(self, kind: SiteKind) -> None:
        limit = self.limits.sites.get(kind)
        if limit is not None:
            raise BackendUnsupportedError(f"{kind.value} are not available on vLLM ({limit.why}); {limit.fix}")
        if not self.served(kind):
            served = ", ".join(sorted(k.value for k in self.graph_kinds))
            raise BackendUnsupportedError(
                f"{kind.value} is not served by this CUDA-graph engine (it serves {served}): a replayed "
                f"graph runs no Python except at the sites named when the model was loaded. Load it with "
                f"cuda_graphs=[{', '.join(sorted(repr(k.value) for k in self.graph_kinds | {kind}))}]"
                f", or without cuda_graphs for an eager engine that serves every site")

    def read(self, kind: SiteKind, layer: int | None) -> Any:
        self._require(kind)
        if kind is SiteKind.LOGITS:
            # nnsight's VLLM exposes the step's pre-sampling logits as a property of the
            # model ([1, vocab] per request), not as a module output.
            return guarded(self.model.logits.unsqueeze(-2))
        envoy = self._module_envoy(kind, layer)
        if kind is SiteKind.LAYERS_INPUT:
            args = envoy.inputs[0]
            at = _hidden_arg_index(args)
            hidden = args[at]
            residual = args[at + 1] if at + 1 < len(args) else None
            value = hidden if residual is None else hidden + residual
            fresh = residual is not None
        else:
            out = envoy.output
            fresh = isinstance(out, tuple) and len(out) > 1 and out[1] is not None
            value = (out[0] + out[1] if fresh else out[0]) if isinstance(out, tuple) else out
        if kind is SiteKind.EMBEDDINGS_OUTPUT and self.paths.embeddings_multiplier:
            # vLLM's Gemma scales the embeddings after the module, HF's inside it
            value, fresh = value * self._embeddings_multiplier(), True
        # [tokens, hidden] -> [1, tokens, hidden] (vLLM's transformers back end keeps
        # HF's batch of one); a sum is already a private tensor, a module's own output
        # is vLLM's buffer and is copied
        if value.dim() == 2:
            value = value.unsqueeze(0)
        return value.as_subclass(ReadOnlyActivation) if fresh else guarded(value)

    def _embeddings_multiplier(self) -> torch.Tensor:
        # the engine's own buffer (in the worker, inside a trace), so the product is the
        # one the model computes, in its dtype
        return resolve_path(torch_module(self.model), self.paths.embeddings_multiplier)

    def add(self, kind: SiteKind, layer: int | None, delta: torch.Tensor) -> None:
        """Add ``delta`` to a site at every token, in place: one kernel, no copies.

        The residual stream after a Llama-family layer is ``hidden + residual``, so adding
        to ``hidden`` adds to the stream. In place is also what a CUDA-graph engine needs:
        the graph reads its own memory back.
        """
        if kind is not SiteKind.LAYERS_OUTPUT:
            return super().add(kind, layer, delta)
        self._require(kind)
        out = self._module_envoy(kind, layer).output
        hidden = out[0] if isinstance(out, tuple) else out
        hidden += delta

    def write(self, kind: SiteKind, layer: int | None, value: Any) -> None:
        self._require(kind)
        value = plain(value)
        if kind is SiteKind.LOGITS:
            current = self.model.logits
            self.model.logits = value.reshape(current.shape).to(current.dtype).clone()
            return
        envoy = self._module_envoy(kind, layer)
        if kind is SiteKind.LAYERS_INPUT:
            args, kwargs = envoy.inputs
            at = _hidden_arg_index(args)
            new = value.reshape(args[at].shape).to(args[at].dtype).clone()
            rest = list(args[at + 1:])
            if rest and isinstance(rest[0], torch.Tensor):
                rest[0] = torch.zeros_like(new)  # the layer's fused norm adds it: new + 0
            envoy.inputs = ((*args[:at], new, *rest), kwargs)
            return
        if kind is SiteKind.EMBEDDINGS_OUTPUT and self.paths.embeddings_multiplier:
            value = value / self._embeddings_multiplier()  # the model multiplies it back
        current = envoy.output
        first = current[0] if isinstance(current, tuple) else current
        # A private copy: vLLM's fused kernels write into their inputs, and the caller
        # may still hold `value`.
        new = value.reshape(first.shape).to(first.dtype).clone()
        if isinstance(current, tuple):
            if len(current) > 1 and current[1] is not None and kind is SiteKind.LAYERS_OUTPUT:
                envoy.output = (new, torch.zeros_like(new), *current[2:])
            else:
                envoy.output = (new, *current[1:])
        else:
            envoy.output = new

    # -- running -------------------------------------------------------------------------

    def trace(self, *inputs: Any, **kwargs: Any):
        if self.graph_kinds is not None:
            raise BackendUnsupportedError(
                "this engine was loaded with cuda_graphs for nnterp.dsl.run(): the model is compiled "
                "and replayed as CUDA graphs, where nnsight's interventions cannot run. Load another "
                "StandardizedTransformer(..., backend='vllm') without cuda_graphs for model.trace() "
                "and model.generate()")
        if "max_new_tokens" in kwargs:
            kwargs["max_tokens"] = kwargs.pop("max_new_tokens")
        kwargs.setdefault("temperature", 0.0)
        kwargs.setdefault("max_tokens", 1)
        for prompt in flatten_prompts(inputs):
            check_prompt_length(self.model, prompt)
        kwargs.setdefault("tracer_cls", tracer_class())
        return self.model.trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, max_tokens: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, **kwargs: Any):
        return self.trace(*inputs, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, **kwargs)

    def execute(self, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
        """Run a lowered plan on every prompt: batch-wide in the engine (the default), or
        with nnsight, one request and one intervention per prompt."""
        return self.execute_many([(plan, prompts, sampling)])[0]

    def execute_many(self, jobs: Sequence[tuple[Plan, Sequence[str], Sampling]]) -> list[Execution]:
        """Run several plans, each on its prompts: the batched executor sends the
        requests of all of them to the engine at once, so they share its batches."""
        checked = []
        for plan, prompts, sampling in jobs:
            for site in plan.sites():
                self._require(site.kind)
            prompts = Prompts.of(prompts, self.model.tokenizer)
            # one look-up of the limit for a sweep: thousands of prompts, one check each
            limit = self.max_model_len
            for ids in prompts.token_ids:
                if len(ids) >= limit:
                    raise PromptTooLongError(too_long(len(ids), limit))
            checked.append((plan, prompts, sampling))
        if self.dsl_executor == "batched":
            return execute_batched_many(self, checked)
        return [execute_nnsight(self, plan, prompts, sampling) for plan, prompts, sampling in checked]

    def project_on_vocab(self, hidden: Any) -> Any:
        # Inside a trace this runs in the worker, where the modules hold weights; outside
        # one, the client holds only a meta-device shell of the model.
        root = torch_module(self.model)
        lm_head = resolve_path(root, self.paths.lm_head)
        if lm_head.weight.is_meta:
            raise BackendUnsupportedError(
                "project_on_vocab on the vLLM backend works inside a trace (the weights live in "
                "the engine); read the projection inside the trace and save it"
            )
        x = plain(hidden)
        if self.paths.final_norm is not None:
            x = resolve_path(root, self.paths.final_norm)(x)
            if isinstance(x, tuple):
                x = x[0]
        return unembed(root, lm_head, x, getattr(self.config, "final_logit_softcapping", None))

    # -- weights ---------------------------------------------------------------------------

    def _locate_weight(self, ref: Any) -> Any:
        # This process's meta copy of the model has the engine's module types and
        # packing (qkv_proj, gate_up_proj), so the weight is found here, with no RPC.
        return locate(torch_module(self.model), ref)

    def _read_weight(self, ref: Any, where: Any) -> torch.Tensor:
        """Every worker's share of the tensor, put together (`nnterp.backends.weights`).

        In the client each worker is asked over vLLM's RPC (``nnterp_weight``); inside a
        trace this code runs in the worker, on its own module.
        """
        import pickle

        llm = self.model.vllm_entrypoint
        if llm is not None:
            replies = llm.collective_rpc("nnterp_weight", args=(where.module, where.tensor, where.partition))
            value = assemble([piece for reply in replies for piece in pickle.loads(reply)])
        else:
            value = self._read_weight_here(where)
        if where.unpack:
            value = unpack(value, ref.packing, ref.part, HeadLayout.of(self.config)).clone()
        return value

    def _read_weight_here(self, where: Any) -> torch.Tensor:
        root = torch_module(self.model)
        if getattr(resolve_path(root, where.module), where.tensor).is_meta:
            raise BackendUnsupportedError("this model's engine is closed, and the weights closed with it; "
                                          "load the model again to read them")
        from vllm.distributed import get_tensor_model_parallel_world_size

        if get_tensor_model_parallel_world_size() > 1:
            raise BackendUnsupportedError(
                "model.weight(...) inside a trace runs in each tensor-parallel rank, which holds only its "
                "shard of the weight; call it before the trace and use the tensor inside")
        return assemble(local_pieces(root, where)).clone()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        from nnterp.backends.vllm_cpu import shutdown_vllm

        shutdown_vllm(self.model)
        self._closed = True
        closed(self)


def _hidden_arg_index(args: tuple) -> int:
    """Where the hidden states are among a vLLM decoder layer's positional arguments.

    Llama-family layers take ``(positions, hidden_states, residual)``; GPT-2 blocks take
    ``(hidden_states,)``. The hidden states are the first floating-point tensor; the
    residual, where there is one, follows (``None`` before the first layer).
    """
    for index, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            return index
    raise ArchitectureNotSupportedError(
        f"a vLLM decoder layer was called without a floating-point tensor argument "
        f"({[type(a).__name__ for a in args]}); nnterp cannot find its hidden states"
    )
