"""The parity tests' comparison rule itself, on hand-made tensors (no model, no engine)."""

from __future__ import annotations

import pytest
import torch

from test_vllm_backend import assert_close_per_token


def test_in_bfloat16_a_value_may_differ_from_hf_as_far_as_hf_differs_from_float32():
    exact = torch.tensor([[10.0, 0.0, 5.0]])
    want = torch.tensor([[12.0, 0.0, 5.0]])  # HF's rounding put feature 0 two off
    got = torch.tensor([[9.0, 0.0, 5.0]])  # vLLM's: one off, on the other side
    with pytest.raises(AssertionError, match=r"row 0 token 0 feature 0 \|diff\| 3 exceeds"):
        assert_close_per_token(got, want, "against HF alone", atol=0.1, token_rtol=0.0)
    assert_close_per_token(got, want, "against float32", atol=0.1, token_rtol=0.0, exact=exact)
    # the allowance is HF's error at that element only: feature 1 is exact on HF
    with pytest.raises(AssertionError, match=r"token 0 feature 1 \|diff from float32\| \(HF's own: 0\) 0.5 exceeds"):
        assert_close_per_token(got + torch.tensor([0.0, 0.5, 0.0]), want, "off", atol=0.1, token_rtol=0.0,
                               exact=exact)
    with pytest.raises(AssertionError, match="feature 2"):  # NaN fails
        assert_close_per_token(torch.tensor([[10.0, 0.0, float("nan")]]), want, "nan", exact=exact)
    with pytest.raises(AssertionError, match="not finite"):  # HF's inf would allow anything
        assert_close_per_token(got, torch.tensor([[float("inf"), 0.0, 5.0]]), "inf", exact=exact)
