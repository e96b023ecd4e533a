"""nnsight's vLLM tracer as nnterp uses it: each prompt's length is checked before the
engine sees it, and nnterp's own errors raised in the worker come back as themselves.

A trace's body runs in the engine's worker, so nnterp's checks there (a layer index out
of range, a NaN steering vector, an in-place edit of a copy) reach the client as
nnsight's ``RuntimeError`` carrying the original type's name; `translate_worker_error`
restores the error nnterp promises.
"""

from __future__ import annotations

from typing import Any

from nnterp.backends.weights import META_WEIGHT_MESSAGE
from nnterp.errors import BackendUnsupportedError, PromptTooLongError
from nnterp.limits import VLLM as VLLM_LIMITS

__all__ = ["tracer_class", "check_prompt_length", "too_long", "flatten_prompts", "HINT_NOT_HF"]

#: How every "not on vLLM" error ends: where to go instead.
HINT_NOT_HF = (
    f"{VLLM_LIMITS.nodes['Grad'].why}, and {VLLM_LIMITS.nodes['AttentionProbs'].why}; "
    "load the model with backend='hf' for them."
)


def translate_worker_error(message: str) -> Exception | None:
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
                                       f"inference mode). {HINT_NOT_HF} (worker said: {first})")
    return None


def tracer_class() -> type:
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
            for prompt in flatten_prompts(inputs):
                check_prompt_length(self.envoy, prompt)
            return VLLMTracer.invoke(self, *inputs, **kwargs)

        def __exit__(self, exc_type, exc_value, traceback):
            try:
                # named, not super(): nnsight recompiles the code of a trace's frames,
                # which loses the implicit __class__ cell
                return VLLMTracer.__exit__(self, exc_type, exc_value, traceback)
            except RuntimeError as err:
                translated = translate_worker_error(str(err))
                if translated is None:
                    raise
                raise translated from err

    NnterpVLLMTracer.__module__ = __name__
    NnterpVLLMTracer.__qualname__ = "NnterpVLLMTracer"
    return NnterpVLLMTracer


def check_prompt_length(vllm_model: Any, prompt: Any) -> None:
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
        raise PromptTooLongError(too_long(n, limit))


def too_long(n: int, limit: int) -> str:
    return (f"the prompt has {n} tokens but this engine's max_model_len is {limit}; "
            f"shorten it or load the model with a larger max_model_len (and KV cache)")


def flatten_prompts(inputs: tuple) -> list:
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
