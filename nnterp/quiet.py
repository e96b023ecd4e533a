"""Quiet libraries: vLLM, torch, transformers and tqdm without their log lines and bars.

A command of nnterp's command line is quiet unless ``--verbose``; a Python user asks for
it with ``StandardizedTransformer(..., quiet=True)``. Both go through the settings each
library reads itself (`QUIET_ENV`), in this process and in the vLLM engine's processes,
which inherit the environment. Importing nnterp configures nothing: this module acts
only when called.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["QUIET_ENV", "quiet_libraries", "quiet_environment"]

#: Environment variable -> value that silences one source of stderr noise, read by the
#: library itself in this process and in the vLLM engine's processes, which inherit the
#: environment. A variable the user has set is left as it is.
QUIET_ENV = {
    # vLLM's own log lines (engine start-up, weights, KV cache), in every process, once
    # vLLM has configured its logging
    "VLLM_LOGGING_LEVEL": "ERROR",
    # torch's Python loggers: "Triton not available" when vLLM registers its kernels
    "TORCH_LOGS": "-torch",
    # warnings printed by C++ code through c10: the engine's "NUMA binding" notice
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    # tqdm bars, which tqdm reads when first imported: vLLM's "Loading safetensors
    # checkpoint shards", "Rendering prompts" and "Processed prompts". Not TQDM_DISABLE:
    # vLLM passes ``disable=`` itself for the first, and divides by a bar's elapsed time,
    # which a disabled bar leaves at 0 (ZeroDivisionError in LLM.generate, vLLM 0.32). A
    # bar that waits forever before it first draws measures time but never draws.
    "TQDM_DELAY": "inf",
    # FlashInfer's JIT logger on a GPU engine ("[Autotuner]: Autotuning process starts"
    # while vLLM warms up): a logger of its own, with its own handler, that reads only this
    # variable when flashinfer is imported in the engine's process
    "FLASHINFER_LOGGING_LEVEL": "error",
    # transformers' "Loading weights" bar (read through huggingface_hub) and its warnings
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # a deprecation raised inside vLLM's kernel dispatcher (-W syntax; a comma would
    # split the filter, so the message is matched up to its first comma)
    "PYTHONWARNINGS": "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
}


def quiet_libraries() -> None:
    """Silence the libraries a command loads (see `QUIET_ENV`).

    Some sources need more than the environment. ``PYTHONWARNINGS`` is read only when an
    interpreter starts, so this process gets the same filter directly. vLLM warns through
    the ``vllm`` logger while it builds an engine's configuration, before it applies
    ``VLLM_LOGGING_LEVEL`` ("Triton is not installed", "Reset SSM cache type"), when
    Python's last-resort handler would print them. And transformers reads its settings
    when imported, which has already happened when `main` is called from Python.
    """
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)

    def ours(name: str) -> bool:
        return os.environ[name] == QUIET_ENV[name]

    if ours("PYTHONWARNINGS"):
        warnings.filterwarnings("ignore", message="`torch.distributed.reduce_op` is deprecated",
                                category=FutureWarning)
    if ours("VLLM_LOGGING_LEVEL"):
        logging.getLogger("vllm").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if ours("HF_HUB_DISABLE_PROGRESS_BARS"):
            hf_logging.disable_progress_bar()
        if ours("TRANSFORMERS_VERBOSITY"):
            hf_logging.set_verbosity_error()


def quiet_environment() -> dict[str, str]:
    """The quieting variables the user has not set, for an engine's processes to inherit."""
    return {name: value for name, value in QUIET_ENV.items() if name not in os.environ}
