"""Settings shared by the backend tests: the parity dtype and the engine arguments."""

from __future__ import annotations

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
