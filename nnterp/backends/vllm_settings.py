"""Engine settings that nnterp derives from a user's choices, before a vLLM engine starts.

vLLM reads several of its choices from environment variables in the engine's own
processes (the engine core and every worker), which are spawned when the engine is
dispatched and copy the client's environment at that moment. So these settings are
applied around the dispatch (`engine_environment`) and the client's environment is
restored afterwards: loading a model does not change the process that loaded it.

Three settings live here:

* float32 on a GPU computes in float32 (`float32_engine_environment`);
* ``nvlink_multicast=False`` keeps a tensor-parallel engine off NVLink multicast
  (`without_multicast`);
* ``cuda_graphs=`` names the sites a compiled engine hooks (`graph_site_kinds`);
* the executor's layout, carried to the workers in ``additional_config``
  (`executor_config`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

from nnterp.backends.batch_program import HOOKABLE
from nnterp.rename import ModulePaths
from nnterp.sites import SiteKind

__all__ = [
    "CONFIG_KEY",
    "executor_config",
    "DEFAULT_GRAPH_SITES",
    "graph_site_kinds",
    "FLOAT32_ENVIRONMENT",
    "NO_MULTICAST_ENVIRONMENT",
    "engine_environment",
    "float32_engine_environment",
    "without_multicast",
]

#: What a float32 engine on a GPU needs to compute in float32. vLLM runs float32 attention
#: with its Triton kernels, whose dot products on float32 inputs default to TF32 (10-bit
#: mantissas): on an H200 that put the tiny models' residual streams 1e-4 (at scale 0.2)
#: from HF's, and SmolLM2's layer 17 0.03 (at 6.9); with these settings the tiny models
#: agree to 5e-8, float32's own rounding. A value the user set is kept.
FLOAT32_ENVIRONMENT = {"TRITON_F32_DEFAULT": "ieee", "VLLM_FLOAT32_MATMUL_PRECISION": "highest"}

#: vLLM 0.26 at ``tensor_parallel_size > 1`` fuses each all-reduce with the RMSNorm after
#: it and auto-selects FlashInfer's "mnnvl" all-reduce for that fusion, which builds NVLink
#: multicast objects. On a host where multicast is switched off the engine dies in its
#: start-up profiling run (an illegal memory access), and on shared hosts multicast must
#: not be used at all. These settings keep every all-reduce on NCCL or FlashInfer's
#: "trtllm" backend without multicast, and switch off the other multicast users (NCCL's
#: NVLS algorithms, PyTorch's and NVSHMEM's symmetric memory); `without_multicast` also
#: turns the fusion off (``pass_config.fuse_allreduce_rms=False``).
NO_MULTICAST_ENVIRONMENT = {
    "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


#: the variable that lists, for vLLM's Ray executor, which others to copy to its workers
_RAY_COPIES = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"


def float32_engine_environment(dtype: Any, cpu: bool) -> dict[str, str]:
    """The environment variables a ``dtype`` engine needs for full float32 (none on CPU,
    where no Triton kernel runs, and none unless float32 was asked for)."""
    if cpu or str(dtype).removeprefix("torch.") not in ("float32", "float"):
        return {}
    return {key: value for key, value in FLOAT32_ENVIRONMENT.items() if key not in os.environ}


def without_multicast(engine_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``engine_kwargs`` with the all-reduce fusion off, and the environment the engine's
    processes need so that nothing in them uses NVLink multicast.

    The user's own ``compilation_config`` (a dict or vLLM's ``CompilationConfig``) is kept
    and only ``pass_config.fuse_allreduce_rms`` is set; a user who set it to True, or an
    environment variable above to a value that allows multicast, asked for two opposite
    things, which is an error rather than a silent choice between them.
    """
    kwargs = dict(engine_kwargs)
    config = kwargs.get("compilation_config")
    if isinstance(config, bool) or not (config is None or isinstance(config, (int, dict))
                                        or hasattr(config, "pass_config")):
        raise TypeError(f"compilation_config must be an int, a dict or vLLM's CompilationConfig, got "
                        f"{type(config).__name__}")
    if config is None:
        config = {}
    elif isinstance(config, int):  # vLLM reads an int as the compilation mode
        config = {"mode": config}
    config = copy.deepcopy(config)  # the user's own is left as it was
    if isinstance(config, dict):
        config["pass_config"] = _fusion_off(config.get("pass_config"))
    else:  # vLLM's CompilationConfig
        config.pass_config = _fusion_off(config.pass_config)
    kwargs["compilation_config"] = config
    clashes = [f"{key}={os.environ[key]}" for key, value in NO_MULTICAST_ENVIRONMENT.items()
               if os.environ.get(key, value) != value]
    if clashes:
        raise ValueError(
            f"nvlink_multicast=False, but this process's environment sets {', '.join(clashes)}, "
            f"which lets vLLM use NVLink multicast; unset them (nnterp sets "
            f"{', '.join(f'{k}={v}' for k, v in NO_MULTICAST_ENVIRONMENT.items())} for the engine)")
    return kwargs, dict(NO_MULTICAST_ENVIRONMENT)


def _fusion_off(passes: Any) -> Any:
    """``passes`` (a dict, vLLM's ``PassConfig`` or None) with the all-reduce fusion off."""
    passes = {} if passes is None else passes
    if isinstance(passes, dict):
        asked = passes.get("fuse_allreduce_rms")
    else:
        asked = getattr(passes, "fuse_allreduce_rms", None)
    if asked:
        raise ValueError(
            "nvlink_multicast=False, but compilation_config sets pass_config.fuse_allreduce_rms=True: "
            "on vLLM 0.26 that fusion picks FlashInfer's multicast all-reduce; drop one of the two")
    if isinstance(passes, dict):
        return {**passes, "fuse_allreduce_rms": False}
    passes.fuse_allreduce_rms = False  # a copy already: the caller copied the whole config
    return passes


@contextlib.contextmanager
def engine_environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment for the duration (the engine's
    processes, spawned meanwhile, inherit them), then restore it.

    vLLM's Ray executor gives its workers only the variables it copies (``VLLM_*``,
    ``NCCL_*`` and those named in ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY``), so the other
    names are added to that list for the duration too.
    """
    values = dict(values)
    others = [name for name in values if not name.startswith(("VLLM_", "NCCL_"))]
    if others:
        listed = [name for name in os.environ.get(_RAY_COPIES, "").split(",") if name]
        values[_RAY_COPIES] = ",".join(dict.fromkeys([*listed, *others]))
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: What ``cuda_graphs=True`` serves: the residual stream after every layer, which is
#: what `Steer`, `Lens` and most reads touch. Each served site adds a few kernels per
#: layer to the compiled graph, so name only the ones a workload touches.
DEFAULT_GRAPH_SITES = ("layers_output",)


def graph_site_kinds(cuda_graphs: Any) -> frozenset[SiteKind] | None:
    """The site kinds a ``cuda_graphs=`` setting serves; ``None`` for an eager engine."""
    if cuda_graphs is False or cuda_graphs is None:
        return None
    names = DEFAULT_GRAPH_SITES if cuda_graphs is True else (
        (cuda_graphs,) if isinstance(cuda_graphs, str) else tuple(cuda_graphs))
    valid = {kind.value: kind for kind in HOOKABLE}
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise ValueError(
            f"cuda_graphs={cuda_graphs!r}: give True or site names among {', '.join(valid)} "
            f"(unknown: {', '.join(map(repr, unknown)) or 'none given'})")
    return frozenset(valid[name] for name in names)


#: The ``additional_config`` key that carries the hook layout to the workers.
CONFIG_KEY = "nnterp_executor"
#: Version of the hook layout, part of vLLM's compile-cache key.
LAYOUT_VERSION = 1

def executor_config(kinds: tuple[SiteKind, ...], paths: ModulePaths | None, eager: bool,
                    vector_rows: int = 256, capture_bytes: int = 256 * 1024 * 1024) -> dict:
    """The ``additional_config`` entry that makes nnterp's worker hook ``kinds``.

    Args:
        kinds: the site kinds to hook at every layer.
        paths: the module paths, or None to find them from the model type.
        eager: whether the engine runs eagerly (hooks may then skip idle sites).
        vector_rows: rows of the edit-vector table.
        capture_bytes: size of the capture buffer.
    """
    import attrs

    return {
        "version": LAYOUT_VERSION,
        "sites": [kind.value for kind in kinds],
        "paths": None if paths is None else attrs.asdict(paths),
        "eager": eager,
        "vector_rows": vector_rows,
        "capture_bytes": capture_bytes,
    }


# -- the device side ---------------------------------------------------------------------
