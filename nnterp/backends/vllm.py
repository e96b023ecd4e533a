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
   hidden]`` (one prompt per invoke), and vLLM's fused kernels overwrite buffers in
   place later in the step. Reads therefore return private copies shaped like the HF
   backend's (``[1, tokens, hidden]``), guarded so that an in-place edit of one raises
   instead of silently doing nothing (assign to the accessor to write).
3. **The intervention code runs in the engine's worker.** nnsight ships the body of a
   ``with model.trace(...)`` block to the worker, so everything the accessors touch
   must be picklable and importable there (this module is).

Logits exist only where vLLM samples: the last position of each request. The
``logits`` accessor returns ``[1, 1, vocab]`` per request, so ``logits[:, -1]`` means the
same on both backends.

On a machine without CUDA the engine runs on vLLM's CPU backend through
`nnterp.backends.vllm_cpu`. vLLM itself is imported only inside functions.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nnterp.backends.base import Backend, SiteKind
from nnterp.errors import ArchitectureNotSupportedError, BackendUnsupportedError, PromptTooLongError
from nnterp.rename import ModulePaths, mapping_error_message, missing_paths, paths_for, resolve_path

__all__ = ["VLLMBackend", "ReadOnlyActivation"]

#: How every "not on vLLM" error ends: where to go instead.
_HINT_NOT_HF = (
    "vLLM computes no gradients and never materialises attention probabilities; "
    "load the model with backend='hf' for them."
)

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


class VLLMBackend(Backend):
    """Standardized sites on an nnsight ``VLLM`` engine.

    Args:
        name_or_path: a Hugging Face model folder or hub id.
        paths: where the components live, for a family nnterp does not know.
        **kwargs: engine arguments (``dtype``, ``max_model_len``,
            ``tensor_parallel_size``, ``kv_cache_memory_bytes``, ...). On CPU, defaults
            from `nnterp.backends.vllm_cpu.cpu_engine_kwargs` fill what is not given.
    """

    name = "vllm"

    def __init__(self, name_or_path: str, *, paths: ModulePaths | None = None, **kwargs: Any) -> None:
        # nnsight refuses vLLM's V2 model runner; make the default explicit so a user's
        # environment cannot pick it.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from nnterp.backends import vllm_cpu

        if isinstance(kwargs.get("dtype"), torch.dtype):
            kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
        if vllm_cpu.is_cpu_only():
            if "max_model_len" not in kwargs:
                kwargs["max_model_len"] = _cpu_max_model_len(name_or_path)
            self.model = vllm_cpu.load_cpu_vllm(name_or_path, **kwargs)
        else:
            from nnsight.modeling.vllm import VLLM

            kwargs.setdefault("dispatch", True)
            kwargs.setdefault("enable_prefix_caching", False)
            self.model = VLLM(name_or_path, **kwargs)
        self._closed = False
        root = self.model._module
        model_type = getattr(self.model.config, "model_type", "?")
        self.paths = paths if paths is not None else paths_for(model_type, root)
        problems = missing_paths(root, self.paths)
        if problems:
            self.close()
            raise ArchitectureNotSupportedError(mapping_error_message(model_type, type(root).__name__, problems))
        self._num_layers = len(resolve_path(root, self.paths.layers))

    # -- description -----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def enable_attention_probs(self) -> bool:
        return False

    # -- reading and writing ---------------------------------------------------------

    def read(self, kind: SiteKind, layer: int | None) -> Any:
        if kind is SiteKind.ATTENTION_PROBABILITIES:
            raise BackendUnsupportedError(f"attention probabilities are not available on vLLM. {_HINT_NOT_HF}")
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
        else:
            out = envoy.output
            if isinstance(out, tuple):
                value = out[0] + out[1] if len(out) > 1 and out[1] is not None else out[0]
            else:
                value = out
        return _guarded(value.unsqueeze(0))  # [tokens, hidden] -> [1, tokens, hidden]

    def write(self, kind: SiteKind, layer: int | None, value: Any) -> None:
        if kind is SiteKind.ATTENTION_PROBABILITIES:
            raise BackendUnsupportedError(f"attention probabilities are not available on vLLM. {_HINT_NOT_HF}")
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

    def project_on_vocab(self, hidden: Any) -> Any:
        # Inside a trace this runs in the worker, where the modules hold weights; outside
        # one, the client holds only a meta-device shell of the model.
        root = self.model._module
        weight = resolve_path(root, self.paths.lm_head).weight
        if weight.is_meta:
            raise BackendUnsupportedError(
                "project_on_vocab on the vLLM backend works inside a trace (the weights live in "
                "the engine); read the projection inside the trace and save it"
            )
        x = _plain(hidden)
        if self.paths.final_norm is not None:
            x = resolve_path(root, self.paths.final_norm)(x)
            if isinstance(x, tuple):
                x = x[0]
        logits = torch.nn.functional.linear(x, weight)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        from nnterp.backends.vllm_cpu import shutdown_vllm

        shutdown_vllm(self.model)
        self._closed = True


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
    gradient_signs = ("does not require grad", "Inference tensors cannot be saved for backward",
                      "inference tensor", "backward")
    if any(sign in first for sign in gradient_signs):
        return BackendUnsupportedError(f"gradients are not available on vLLM (the engine runs in "
                                       f"inference mode). {_HINT_NOT_HF} (worker said: {first})")
    return None


def _tracer_class():
    from nnsight.modeling.vllm.tracer import VLLMTracer

    global _NnterpVLLMTracer
    if _NnterpVLLMTracer is None:
        class NnterpVLLMTracer(VLLMTracer):
            """nnsight's vLLM tracer: checks each invoke's prompt length before the engine
            sees it, and re-raises nnterp's own errors from the worker."""

            def invoke(self, *inputs, **kwargs):
                for prompt in _flatten_prompts(inputs):
                    _check_prompt_length(self.envoy, prompt)
                return super().invoke(*inputs, **kwargs)

            def __exit__(self, exc_type, exc_value, traceback):
                try:
                    return super().__exit__(exc_type, exc_value, traceback)
                except RuntimeError as err:
                    translated = _translate_worker_error(str(err))
                    if translated is None:
                        raise
                    raise translated from err

        _NnterpVLLMTracer = NnterpVLLMTracer
    return _NnterpVLLMTracer


_NnterpVLLMTracer = None


def _check_prompt_length(vllm_model: Any, prompt: Any) -> None:
    """Refuse a prompt the engine cannot hold, before it becomes a request.

    vLLM rejects such a request deep inside the engine; checking here gives a message
    that says what to change and leaves the engine untouched for the next trace.
    """
    if not isinstance(prompt, str):
        return
    limit = vllm_model.vllm_entrypoint.llm_engine.model_config.max_model_len
    n = len(vllm_model.tokenizer(prompt)["input_ids"])
    if n >= limit:
        raise PromptTooLongError(
            f"the prompt has {n} tokens but this engine's max_model_len is {limit}; "
            f"shorten it or load the model with a larger max_model_len (and KV cache)"
        )


def _flatten_prompts(inputs: tuple) -> list:
    prompts = []
    for item in inputs:
        if isinstance(item, (list, tuple)):
            prompts.extend(item)
        else:
            prompts.append(item)
    return prompts


def execute_plan(plan: Any, backend: "VLLMBackend", prompts: list[str], sampling: Any) -> dict:
    """Run a lowered plan on vLLM: one request (invoke) per prompt, in one trace.

    Each invoke's ops run in the engine's worker; results come back in ``store``, a
    dict saved above the invokes, which nnsight merges key by key across requests.

    Returns:
        ``{"store": results by (name, step, prompt...), "tokens": [[ids] per prompt]}``.
    """
    import nnsight

    from nnterp.backends.interpret import generation_may_end_early, run_step

    steps = plan.max_step + 1
    with generation_may_end_early(), backend.generate(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed) as tracer:
        store = nnsight.save({})
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                pending = {}
                for step in tracer.iter[:steps]:
                    run_step(backend, plan, step, [row], [0], store, pending)
                    store[("__sample__", step, row)] = int(backend.model.samples.reshape(-1)[0])
                # Not reached when the request ends (end of sequence) before `steps`
                # steps: then the samples recorded above are the whole generation.
                store[("__tokens__", row)] = list(tracer.result.outputs[0].token_ids)
    tokens = []
    for row in range(len(prompts)):
        samples = [store.pop(key) for key in sorted(k for k in store if k[0] == "__sample__" and k[2] == row)]
        tokens.append(store.pop(("__tokens__", row), samples))
    return {"store": store, "tokens": tokens}


def _register() -> None:
    from nnterp.dsl.lowering import register_executor

    register_executor("vllm", execute_plan)


_register()
