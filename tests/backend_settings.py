"""Settings shared by the backend tests: the parity dtype and the engine arguments."""

from __future__ import annotations

import os

#: dtype of the backend-parity tests: float32 in CI; the GPU run also uses bfloat16.
TEST_DTYPE = os.environ.get("NNTERP_TEST_DTYPE", "float32")


def engine_kwargs() -> dict:
    """Engine arguments for tests: the test dtype; on a GPU, a slice of its memory each,
    since several engines stay up for the session."""
    import torch

    kwargs = {"dtype": TEST_DTYPE}
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=0.08, max_model_len=512)
    return kwargs
