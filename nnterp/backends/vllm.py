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

import atexit
import contextlib
import logging
import os
import weakref
from typing import Any, Iterator, Sequence

import torch

from nnterp.backends.base import Backend
from nnterp.backends.batch_program import HOOKABLE
from nnterp.backends.interpret import generation_may_end_early, run_step
from nnterp.backends.load_check import PROBE_TEXT, check_sites, warn_untested
from nnterp.backends.internals import (engine_class, logits_module, plain_engine_steps, sampling_params_fields,
                                            torch_module)
from nnterp.backends.vllm_settings import engine_environment, float32_engine_environment, without_multicast
from nnterp.backends.weights import (META_WEIGHT_MESSAGE, HeadLayout, assemble, guard_meta_parameters,
                                     local_pieces, locate, unpack)
from nnterp.dsl.plan import Plan, Prompts, Sampling
from nnterp.dsl.recorded import Execution
from nnterp.errors import ArchitectureNotSupportedError, BackendUnsupportedError, PromptTooLongError
from nnterp.limits import VLLM as VLLM_LIMITS
from nnterp.rename import KNOWN_ARCHITECTURES, ModulePaths, mapping_error_message, missing_paths, paths_for, resolve_path
from nnterp.sites import SiteKind

__all__ = ["VLLMBackend", "ReadOnlyActivation"]

#: How every "not on vLLM" error ends: where to go instead.
_HINT_NOT_HF = (
    f"{VLLM_LIMITS.nodes['Grad'].why}, and {VLLM_LIMITS.nodes['AttentionProbs'].why}; "
    "load the model with backend='hf' for them."
)
#: how each executor runs plans, as the run manifest records it
_EXECUTOR = "vllm/nnsight: one request per prompt, one intervention per request"
_BATCHED = "vllm/batched: the whole plan in the engine's hooks, batch-wide"

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


def _guarded(value: torch.Tensor) -> torch.Tensor:
    return value.clone().as_subclass(ReadOnlyActivation)


def _plain(value: Any) -> Any:
    if isinstance(value, ReadOnlyActivation):
        return value.as_subclass(torch.Tensor)
    return value


#: What ``cuda_graphs=True`` serves: the residual stream after every layer, which is
#: what `Steer`, `Lens` and most reads touch. Each served site adds a few kernels per
#: layer to the compiled graph, so name only the ones a workload touches.
DEFAULT_GRAPH_SITES = ("layers_output",)



def graph_site_kinds(cuda_graphs: Any) -> frozenset[SiteKind] | None:
    """The site kinds a ``cuda_graphs=`` setting serves; ``None`` for an eager engine."""
    if cuda_graphs is False or cuda_graphs is None:
        return None
    names = DEFAULT_GRAPH_SITES if cuda_graphs is True else (
        (cuda_graphs,) if isinstance(cuda_graphs, str) else tuple(cuda_graphs))
    valid = {kind.value: kind for kind in HOOKABLE}
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise ValueError(
            f"cuda_graphs={cuda_graphs!r}: give True or site names among {', '.join(valid)} "
            f"(unknown: {', '.join(map(repr, unknown)) or 'none given'})")
    return frozenset(valid[name] for name in names)


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
        **kwargs: engine arguments (``dtype``, ``max_model_len``,
            ``tensor_parallel_size``, ``gpu_memory_utilization``, ...). On CPU, defaults
            from `nnterp.backends.vllm_cpu.cpu_engine_kwargs` fill what is not given.
    """

    limits = VLLM_LIMITS

    def __init__(self, name_or_path: str, *, paths: ModulePaths | None = None, cuda_graphs: Any = False,
                 dsl_executor: str = "batched", nvlink_multicast: bool = True, quiet: bool = False,
                 check: bool = True, **kwargs: Any) -> None:
        # nnsight refuses vLLM's V2 model runner; make the default explicit so a user's
        # environment cannot pick it.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from nnterp.backends import vllm_cpu
        from nnterp.backends.vllm_batch import CONFIG_KEY, executor_config

        self.graph_kinds = graph_site_kinds(cuda_graphs)
        if dsl_executor not in ("batched", "nnsight"):
            raise ValueError(f"dsl_executor must be 'batched' or 'nnsight', got {dsl_executor!r}")
        if dsl_executor == "nnsight" and self.graph_kinds is not None:
            raise BackendUnsupportedError(
                "dsl_executor='nnsight' needs an eager engine (nnsight's interventions run in Python "
                "between modules); drop cuda_graphs, or use the batched executor")
        self.dsl_executor = dsl_executor
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
                                        paths, eager),
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
        with _classes_unchanged(_hf_model_classes(name_or_path, kwargs.get("trust_remote_code", False))), \
                engine_environment(environment if quiet else {}):
            if quiet:
                quiet_libraries()  # this process's loggers, with the quiet environment set
            if cpu:
                if "max_model_len" not in kwargs:
                    kwargs["max_model_len"] = _cpu_max_model_len(name_or_path)
                self.model = vllm_cpu.load_cpu_vllm(name_or_path, engine_cls=engine_cls, **kwargs)
            else:
                kwargs.setdefault("enable_prefix_caching", False)
                self.model = engine_cls(name_or_path, dispatch=False, **kwargs)
                self.model.compiled = not eager
        self._closed = False
        _OPEN_ENGINES.add(self)
        # (re-)registered after vLLM made this engine's finalizers, so that it runs
        # before them: atexit runs the handlers registered last first
        atexit.unregister(_close_at_exit)
        atexit.register(_close_at_exit)
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
            return _guarded(self.model.logits.unsqueeze(-2))
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
        return value.as_subclass(ReadOnlyActivation) if fresh else _guarded(value)

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
        value = _plain(value)
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
        for prompt in _flatten_prompts(inputs):
            _check_prompt_length(self.model, prompt)
        kwargs.setdefault("tracer_cls", _tracer_class())
        return self.model.trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, max_tokens: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, **kwargs: Any):
        return self.trace(*inputs, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, **kwargs)

    def execute(self, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
        """Run a lowered plan on every prompt: batch-wide in the engine (the default), or
        with nnsight, one request and one intervention per prompt."""
        for site in plan.sites():
            self._require(site.kind)
        prompts = Prompts.of(prompts, self.model.tokenizer)
        # one look-up of the limit for a sweep: thousands of prompts, one check each
        limit = self.max_model_len
        for ids in prompts.token_ids:
            if len(ids) >= limit:
                raise PromptTooLongError(_too_long(len(ids), limit))
        if self.dsl_executor == "batched":
            return self._execute_batched(plan, prompts, sampling)
        return self._execute_nnsight(plan, prompts, sampling)

    def _execute_batched(self, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
        """Install the plan in every worker, run the prompts as ordinary requests tagged
        with their index, then collect what the workers recorded (`vllm_batch`)."""
        import pickle
        import uuid

        from vllm import SamplingParams

        from nnterp.backends.vllm_transport import read_blocks

        llm = self.model.vllm_entrypoint
        plan_id = uuid.uuid4().hex
        llm.collective_rpc("nnterp_install", args=(plan_id, pickle.dumps(plan)))
        # A prefix served from vLLM's cache is never computed, so no hook would see it, and
        # a prefix this plan edited must not be served to anyone else: with prefix caching
        # on, the run neither reads the cache nor shares what it writes (its own salt).
        fields = sampling_params_fields()
        options = {"skip_reading_prefix_cache": True} if "skip_reading_prefix_cache" in fields else {}
        if "skip_clone" in fields:
            options["skip_clone"] = True  # each request has its own params: no deep copy needed
        # run decodes the generated tokens itself; vLLM's own detokenizer would decode them
        # a second time, request by request (7% of a 1.1B collect of 8,192 prompts on an H200)
        options["detokenize"] = False
        template = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, seed=sampling.seed, **options)
        params = _tagged_copies(template, plan_id, len(prompts), sampling)
        # Token ids, as vLLM would tokenize each prompt one by one: `run` tokenizes a sweep
        # in one batch call, whose cost for thousands of short prompts is about that of
        # their forward passes.
        token_ids = Prompts.of(prompts, self.model.tokenizer).token_ids
        requests = [{"prompt_token_ids": list(ids), "prompt": prompt, "cache_salt": f"nnterp-{plan_id}"}
                    for ids, prompt in zip(token_ids, prompts)]
        try:
            with plain_engine_steps(llm.llm_engine):
                outputs = llm.generate(requests, sampling_params=params, use_tqdm=False)
        finally:
            # always: it also uninstalls the plan, so the engine is ready for the next
            replies = llm.collective_rpc("nnterp_collect", args=(plan_id,))
        values, stats = read_blocks(plan, next(reply for reply in replies if reply is not None))
        tokens = [output.outputs[0].token_ids for output in outputs]
        return Execution(values, tokens, _BATCHED, stats=stats)

    def _execute_nnsight(self, plan: Plan, prompts: Sequence[str], sampling: Sampling) -> Execution:
        """One request (invoke) per prompt, in one nnsight trace.

        Each invoke's ops run in the engine's worker; results come back in ``store``, a
        dict saved above the invokes, which nnsight merges key by key across requests.
        Generated tokens come from the engine's own outputs, so no step pays a handoff
        or a device-to-host copy for them.
        """
        import nnsight

        steps = plan.max_step + 1
        with generation_may_end_early(), self.generate(
                max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, seed=sampling.seed) as tracer:
            store = nnsight.save({})
            # nnsight pickles, for every request, each name its block reads: the prompt
            # pass alone (a lens, a sweep of reads) gets a block without the step loop,
            # which would also ship the tracer.
            if steps == 1:
                for row, prompt in enumerate(prompts):
                    with tracer.invoke(prompt, **_own_seed(sampling, row)):
                        run_step(self, plan, 0, [row], [0], store, {})
            else:
                for row, prompt in enumerate(prompts):
                    with tracer.invoke(prompt, **_own_seed(sampling, row)):
                        scratch = {}
                        # The loop ends early, and nothing after it runs, when the
                        # request reaches end of sequence first; so nothing follows it.
                        for step in tracer.iter[:steps]:
                            run_step(self, plan, step, [row], [0], store, scratch)
        tokens = [output.outputs[0].token_ids for output in self.model.last_outputs]
        return Execution(dict(store), tokens, _EXECUTOR)

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
        x = _plain(hidden)
        if self.paths.final_norm is not None:
            x = resolve_path(root, self.paths.final_norm)(x)
            if isinstance(x, tuple):
                x = x[0]
        return _unembed(root, lm_head, x, getattr(self.config, "final_logit_softcapping", None))

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
        _OPEN_ENGINES.discard(self)


def _close_at_exit() -> None:
    """Close, at interpreter exit, every engine the program left open.

    vLLM stops a forgotten engine from its own finalizers, but badly: they signal the
    engine-core process before the client lets go of it (the client then logs that the
    engine "exited unexpectedly"), give the processes vLLM's default 5 s (an engine
    exiting normally on a busy CPU took longer and was force-killed), and log through a
    handler bound to the ``sys.stdout`` of the moment vLLM was imported, which may be
    closed by then (pytest's capture, a redirected stream): each line became "---
    Logging error --- ValueError: I/O operation on closed file". This closes each
    engine the way `VLLMBackend.close` does, after dropping the log handlers whose
    stream is closed (nothing can be written there any more).
    """
    engines = list(_OPEN_ENGINES)
    if not engines:
        return
    for logger in (logging.getLogger("vllm"), logging.getLogger()):
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    for backend in engines:
        backend.close()


#: the engines loaded and not closed yet, weakly held: one that is garbage-collected is
#: stopped by vLLM's own finalizers
_OPEN_ENGINES: "weakref.WeakSet[VLLMBackend]" = weakref.WeakSet()


def _unembed(root: Any, lm_head: Any, x: torch.Tensor, config_softcap: float | None) -> torch.Tensor:
    """Logits over the real vocabulary, computed as vLLM's own logits processor does.

    vLLM pads the unembedding to a multiple of 64 rows and, under tensor parallelism,
    gives each rank a contiguous slice of those rows (``lm_head.weight`` is this rank's
    slice). So: project on the local rows, all-gather the slices in rank order (every
    rank runs this code and must reach the same collective, so an all-gather rather
    than a gather to rank 0), then drop the padding columns, which would otherwise get
    probability mass in a softmax. Softcapping and logit scale come from the model's
    logits processor where it has one.
    """
    logits = torch.nn.functional.linear(x, lm_head.weight, getattr(lm_head, "bias", None))
    if getattr(lm_head, "tp_size", 1) > 1:
        from vllm.distributed import tensor_model_parallel_all_gather

        logits = tensor_model_parallel_all_gather(logits)
    processor = logits_module(root)
    vocab = getattr(processor, "org_vocab_size", None) or getattr(lm_head, "org_vocab_size", None)
    if vocab is not None:
        logits = logits[..., :vocab]
    softcap = getattr(processor, "soft_cap", None) if processor is not None else config_softcap
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    scale = getattr(processor, "scale", 1.0)
    if scale != 1.0:
        logits = logits * scale
    return logits


def _hf_model_classes(name_or_path: str, trust_remote_code: bool) -> list[type]:
    """The Hugging Face class that vLLM's transformers back end would build for this
    model: the base model of its configuration (``GPTNeoXModel``); none if transformers
    maps no base model to it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        return [MODEL_MAPPING[type(config)]]
    except KeyError:
        return []


@contextlib.contextmanager
def _classes_unchanged(classes: Sequence[type]) -> Iterator[None]:
    """Undo, on leaving, whatever the block did to ``classes``.

    nnsight builds the engine's module tree in this process too (on the meta device), and
    for a family vLLM runs through its generic transformers back end, building it
    decorates Hugging Face's own class in place for torch.compile (new base class,
    ``__init__`` and ``__call__``). Every model of that class in the process would then
    go through vLLM's compiler wrapper: a GPT-NeoX loaded on the HF backend before the
    engine failed with "'GPTNeoXModel' object has no attribute 'do_not_compile'". The
    engine's own processes, which run the model, are not affected by the undo.
    """
    saved = [(cls, cls.__bases__, dict(cls.__dict__)) for cls in classes]
    try:
        yield
    finally:
        for cls, bases, namespace in saved:
            for name in [name for name in cls.__dict__ if name not in namespace]:
                delattr(cls, name)
            for name, value in namespace.items():
                if cls.__dict__.get(name) is not value:
                    setattr(cls, name, value)
            if cls.__bases__ != bases:
                cls.__bases__ = bases


def _cpu_max_model_len(name_or_path: str) -> int:
    """The CPU default context: the model's own limit, capped to fit the default KV cache."""
    from transformers import AutoConfig

    from nnterp.backends.vllm_cpu import DEFAULT_MAX_MODEL_LEN

    config = AutoConfig.from_pretrained(name_or_path)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(DEFAULT_MAX_MODEL_LEN, limit) if limit else DEFAULT_MAX_MODEL_LEN


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


def _translate_worker_error(message: str) -> Exception | None:
    """The nnterp exception behind an error raised in the engine's worker, if any.

    nnsight re-raises a worker's error in the client as a ``RuntimeError`` that
    carries the original type's name in its text; restore the ones nnterp promises.
    """
    first = message.split("\n", 1)[0]
    if first.startswith("BackendUnsupportedError: "):
        return BackendUnsupportedError(first.removeprefix("BackendUnsupportedError: "))
    # a trace's body runs in the worker: nnterp's own checks there (a layer index out of
    # range, a NaN steering vector) reach the user as the error they are, not a RuntimeError
    for kind in (IndexError, ValueError):
        if first.startswith(f"{kind.__name__}: "):
            return kind(first.removeprefix(f"{kind.__name__}: "))
    if "Cannot copy out of meta tensor" in first:
        # a tensor of this process's meta copy of the model, shipped into the trace
        return BackendUnsupportedError(f"a meta-device tensor, which has no values, reached the engine: "
                                       f"{META_WEIGHT_MESSAGE}")
    gradient_signs = ("does not require grad", "Inference tensors cannot be saved for backward",
                      "inference tensor", "backward")
    if any(sign in first for sign in gradient_signs):
        return BackendUnsupportedError(f"gradients are not available on vLLM (the engine runs in "
                                       f"inference mode). {_HINT_NOT_HF} (worker said: {first})")
    return None


def _tracer_class():
    return __getattr__("NnterpVLLMTracer")


def _build_tracer_class() -> type:
    """nnsight's vLLM tracer: checks each invoke's prompt length before the engine sees
    it, and re-raises nnterp's own errors from the worker.

    A module attribute (through ``__getattr__``) rather than a class local to a
    function: every request's worker holds the tracer, and nnsight pickles a class it
    cannot import by value, its methods by their source, once per request.
    """
    from nnsight.modeling.vllm.tracer import VLLMTracer

    class NnterpVLLMTracer(VLLMTracer):
        def invoke(self, *inputs, **kwargs):
            for prompt in _flatten_prompts(inputs):
                _check_prompt_length(self.envoy, prompt)
            return VLLMTracer.invoke(self, *inputs, **kwargs)

        def __exit__(self, exc_type, exc_value, traceback):
            try:
                # named, not super(): nnsight recompiles the code of a trace's frames,
                # which loses the implicit __class__ cell
                return VLLMTracer.__exit__(self, exc_type, exc_value, traceback)
            except RuntimeError as err:
                translated = _translate_worker_error(str(err))
                if translated is None:
                    raise
                raise translated from err

    NnterpVLLMTracer.__module__ = __name__
    NnterpVLLMTracer.__qualname__ = "NnterpVLLMTracer"
    return NnterpVLLMTracer


def _check_prompt_length(vllm_model: Any, prompt: Any) -> None:
    """Refuse a prompt the engine cannot hold, before it becomes a request.

    vLLM rejects such a request deep inside the engine; checking here gives a message
    that says what to change and leaves the engine untouched for the next trace.
    """
    if not isinstance(prompt, str):
        return
    limit = vllm_model.vllm_entrypoint.llm_engine.model_config.max_model_len
    if len(prompt.encode()) + 16 < limit:
        # a token covers at least one byte of the text; the margin is for special tokens
        return
    n = len(vllm_model.tokenizer(prompt)["input_ids"])
    if n >= limit:
        raise PromptTooLongError(_too_long(n, limit))


def _own_seed(sampling: Sampling, row: int) -> dict:
    """A request's own sampling seed, as invoke keywords (none without a run seed)."""
    return {} if sampling.seed is None else {"seed": sampling.request_seed(row)}


def _tagged_copies(template: Any, plan_id: str, n: int, sampling: Sampling) -> list:
    """``n`` shallow copies of ``template``, each tagged with its request's row.

    Each request needs its own params for its tag. Building each anew validates it anew,
    and vLLM's validation reads its environment variables through a slow lookup: 0.6 s of
    a 4,096-prompt lens at 1.1B on an H200 (profiled). A copy of one validated template
    skips all of it; the tag and the request's own seed (`Sampling.request_seed`) are the
    only fields that differ.
    """
    import copy

    copies = []
    for row in range(n):
        params = copy.copy(template)
        params.extra_args = {"nnterp": [plan_id, row]}
        if sampling.seed is not None:
            params.seed = sampling.request_seed(row)
        copies.append(params)
    return copies


def _too_long(n: int, limit: int) -> str:
    return (f"the prompt has {n} tokens but this engine's max_model_len is {limit}; "
            f"shorten it or load the model with a larger max_model_len (and KV cache)")


def _flatten_prompts(inputs: tuple) -> list:
    prompts = []
    for item in inputs:
        if isinstance(item, (list, tuple)):
            prompts.extend(item)
        else:
            prompts.append(item)
    return prompts


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: it subclasses nnsight's vLLM tracer, and
    # importing that imports vLLM. A module attribute, so pickles can name it.
    builders = {"NnterpVLLMTracer": _build_tracer_class}
    if name in builders:
        if name not in _LAZY:
            _LAZY[name] = builders[name]()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
