"""The settings nnterp derives for a vLLM engine before it starts: full float32 on a GPU,
and ``nvlink_multicast=False``. Their effect inside a GPU engine is measured on the GPU
(README, "float32 on a GPU"; `test_tensor_parallel.py` starts its GPU engines with
``nvlink_multicast=False``); here, what they ask of vLLM and of the environment."""

from __future__ import annotations

import os

import pytest
import torch

from nnterp.backends.vllm_settings import (
    FLOAT32_ENVIRONMENT,
    NO_MULTICAST_ENVIRONMENT,
    engine_environment,
    float32_engine_environment,
    without_multicast,
)


def test_a_float32_gpu_engine_starts_with_full_float32_and_the_environment_is_restored(monkeypatch):
    # Measured on an H200: without these, vLLM's float32 attention (Triton) multiplies in
    # TF32 and the residual stream sits 1e-4 from HF's; with them, 5e-8.
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    monkeypatch.setenv("VLLM_FLOAT32_MATMUL_PRECISION", "high")  # the user's choice is kept
    assert float32_engine_environment("float32", cpu=False) == {"TRITON_F32_DEFAULT": "ieee"}
    assert float32_engine_environment(torch.float32, cpu=False) == {"TRITON_F32_DEFAULT": "ieee"}
    assert float32_engine_environment("bfloat16", cpu=False) == {}
    assert float32_engine_environment(None, cpu=False) == {}  # vLLM's "auto" never runs float32
    assert float32_engine_environment("float32", cpu=True) == {}
    assert set(FLOAT32_ENVIRONMENT) == {"TRITON_F32_DEFAULT", "VLLM_FLOAT32_MATMUL_PRECISION"}
    monkeypatch.setenv("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "MINE")
    with engine_environment({"TRITON_F32_DEFAULT": "ieee", "VLLM_FLOAT32_MATMUL_PRECISION": "highest"}):
        assert os.environ["TRITON_F32_DEFAULT"] == "ieee"
        # vLLM's Ray workers get VLLM_* on their own, and the rest only when listed
        assert os.environ["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] == "MINE,TRITON_F32_DEFAULT"
    assert "TRITON_F32_DEFAULT" not in os.environ
    assert os.environ["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] == "MINE"


@pytest.fixture
def clean_environment(monkeypatch):
    for key in NO_MULTICAST_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)


def test_no_multicast_turns_the_fusion_off_and_keeps_the_users_compilation_config(clean_environment):
    kwargs, environment = without_multicast({"dtype": "bfloat16"})
    assert kwargs == {"dtype": "bfloat16", "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
    assert environment == {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
                           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                           "NVSHMEM_DISABLE_NVLS": "1"}
    mine = {"cudagraph_capture_sizes": [1, 8], "pass_config": {"fuse_norm_quant": True}}
    kwargs, _ = without_multicast({"compilation_config": mine})
    assert kwargs["compilation_config"] == {"cudagraph_capture_sizes": [1, 8],
                                            "pass_config": {"fuse_norm_quant": True, "fuse_allreduce_rms": False}}
    assert mine == {"cudagraph_capture_sizes": [1, 8], "pass_config": {"fuse_norm_quant": True}}  # not changed
    # the environment is only returned: the engine's processes get it at dispatch
    assert "NCCL_NVLS_ENABLE" not in os.environ


def test_no_multicast_takes_vllms_own_config_objects(clean_environment):
    pytest.importorskip("vllm")
    from vllm.config import CompilationConfig, PassConfig

    mine = CompilationConfig(cudagraph_capture_sizes=[1, 8])
    kwargs, _ = without_multicast({"compilation_config": mine})
    assert kwargs["compilation_config"].pass_config.fuse_allreduce_rms is False
    assert kwargs["compilation_config"].cudagraph_capture_sizes == [1, 8]
    assert mine.pass_config.fuse_allreduce_rms is not False  # the user's object is left alone
    kwargs, _ = without_multicast({"compilation_config": {"pass_config": PassConfig()}})
    assert kwargs["compilation_config"]["pass_config"].fuse_allreduce_rms is False


def test_no_multicast_takes_every_form_of_compilation_config_vllm_takes(clean_environment):
    passes = {"pass_config": {"fuse_allreduce_rms": False}}
    assert without_multicast({"compilation_config": 3})[0]["compilation_config"] == {"mode": 3, **passes}
    assert without_multicast({"compilation_config": {"pass_config": None}})[0]["compilation_config"] == passes
    with pytest.raises(TypeError, match="compilation_config must be an int, a dict or vLLM's CompilationConfig"):
        without_multicast({"compilation_config": "fast"})


def test_asking_for_the_fusion_or_multicast_and_against_it_is_an_error(clean_environment, monkeypatch):
    with pytest.raises(ValueError, match="nvlink_multicast=False, but compilation_config sets "
                                         "pass_config.fuse_allreduce_rms=True"):
        without_multicast({"compilation_config": {"pass_config": {"fuse_allreduce_rms": True}}})
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")  # agrees: not named
    with pytest.raises(ValueError, match=r"environment sets NCCL_NVLS_ENABLE=1, which lets vLLM use NVLink multicast"):
        without_multicast({})


def test_nvlink_multicast_is_a_vllm_option(tiny_dir):
    from nnterp import StandardizedTransformer

    with pytest.raises(ValueError, match="nvlink_multicast.*vLLM engine option; transformers runs no collective"):
        StandardizedTransformer(tiny_dir("llama"), backend="hf", nvlink_multicast=True)
    # False asks for nothing the HF backend would do anyway
    assert StandardizedTransformer(tiny_dir("llama"), backend="hf", nvlink_multicast=False).num_layers == 3
