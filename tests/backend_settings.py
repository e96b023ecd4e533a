"""Settings shared by the backend tests: the parity dtype and the engine arguments."""

from __future__ import annotations

import os

#: dtype of the backend-parity tests: float32 in CI; the GPU run also uses bfloat16.
TEST_DTYPE = os.environ.get("NNTERP_TEST_DTYPE", "float32")


def engine_kwargs(tiny: bool = False) -> dict:
    """Engine arguments for tests: the test dtype; on a GPU, a slice of its memory each,
    since several engines stay up for the session. On CPU a tiny model's engine gets a
    32 MiB KV cache instead of 256 MiB (it needs under 1 MiB at its 512 positions): a
    dozen engines stay up for the session, about 1.5 GiB each with the default."""
    import torch

    kwargs = {"dtype": TEST_DTYPE}
    if torch.cuda.is_available():
        # NNTERP_TEST_GPU_MEMORY: a smaller slice, to run several test sessions on one GPU
        share = float(os.environ.get("NNTERP_TEST_GPU_MEMORY", "0.08"))
        kwargs.update(gpu_memory_utilization=share, max_model_len=512)
    elif tiny:
        kwargs.update(kv_cache_memory_bytes=32 * 2**20)
    return kwargs
