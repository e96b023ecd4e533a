"""Run nnsight's ``VLLM`` wrapper on a CPU-only host (vLLM's CPU backend).

nnsight 0.8.1 ships ``nnsight.modeling.vllm.VLLM`` for GPUs only. On a host
with no CUDA device, the pieces below break or need care; this module handles them
without editing nnsight or vLLM:

1. **The meta model.** ``VLLM._load_meta`` builds a meta-device copy of the
   module tree with vLLM's ``DummyModelLoader``. ``BaseModelLoader.load_model``
   ends with ``torch.accelerator.empty_cache()``, which raises
   ``RuntimeError: Cannot access accelerator device when none is available``
   on a CPU-only torch. Nothing was allocated on any device (it is a meta
   tree), so `load_cpu_vllm` turns that call into a no-op while nnsight builds
   the tree. (vLLM's own ``CPUModelRunner`` does the same thing in the
   engine process, see ``_set_torch_accelerator_to_noop``; the client process
   never gets that treatment.)

2. **The worker / model runner.** nnsight's worker subclasses vLLM's *GPU* worker and
   refuses any other runner. On CPU the engine must use ``CPUWorker`` (CPU device, OMP
   thread binding, CPU KV-cache sizing) and ``CPUModelRunner`` (CPU tensors, no CUDA
   events or streams). nnterp's ``NnterpCPUWorker`` and ``NnterpCPUModelRunner``
   (`nnterp.backends.internals`, beside their GPU twins) combine nnsight's hooks
   with them, and nnterp's engine class picks them on a host without CUDA.

3. **Engine arguments** (`cpu_engine_kwargs`). ``kv_cache_memory_bytes``
   must be explicit: the default sizing takes ``gpu_memory_utilization`` (0.9)
   of the node's *total RAM* and fails when that much is not free; an explicit
   size also lets ``CPUWorker`` skip its warm-up forward pass. ``max_model_len``
   is capped (2048) because the engine refuses to start unless one full-length
   sequence fits that cache. ``float32`` keeps
   activations comparable with a transformers reference (CPU bf16 is slow and
   lossy). Prefix caching off, because a cached prefix skips the forward and a
   hook would silently see fewer tokens; eager mode, because vLLM's CPU backend
   captures no CUDA graphs, and nnsight's per-module interventions need an eager
   model anyway (a compiled engine, ``cuda_graphs=``, is GPU-only).

4. **Shutdown** (`shutdown_vllm`). ``vllm.LLM`` has no ``close``; the engine
   core and its worker are child processes that only go away when
   ``llm.llm_engine.engine_core.shutdown()`` runs (or at interpreter exit).
   Call it before building a second engine in the same process. It waits longer
   than vLLM's default for the processes to exit (`SHUTDOWN_TIMEOUT_S`), so a
   slow but normal exit is not force-killed.

Importing vLLM is slow and initialises its platform, so vLLM is only imported inside
functions.

Other CPU constraints worth knowing: vLLM's CPU attention supports only some
head sizes (32, 64, 80, 96, 112, 128, ...); ``VLLM_CPU_KVCACHE_SPACE`` (GiB),
if set in the environment, overrides ``kv_cache_memory_bytes``; the engine
process binds OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND``), so don't
call ``torch.set_num_threads`` in the engine.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
# The engine refuses to start unless one max_model_len sequence fits the KV
# cache; a checkpoint's full context (8192 for SmolLM2: 0.35 GiB in float32)
# would not fit the default 256 MiB, so cap it.
DEFAULT_MAX_MODEL_LEN = 2048


def is_cpu_only() -> bool:
    """True when the CPU path is needed: no CUDA device is available."""
    return not torch.cuda.is_available()


def cpu_engine_kwargs(**user_kwargs: Any) -> dict[str, Any]:
    """Engine kwargs for ``VLLM(path, **cpu_engine_kwargs(), dispatch=True)`` on CPU.

    Defaults: float32, a 256 MiB KV cache, ``max_model_len=2048`` (must fit the
    cache), prefix caching off, eager mode.
    Anything in ``user_kwargs`` overrides them. ``worker_cls`` is not one of
    them: nnsight passes its own, which nnterp's engine class chooses (a
    ``worker_cls`` given here raises ``TypeError``).
    """
    if "worker_cls" in user_kwargs:
        raise TypeError(
            "worker_cls cannot be passed to nnsight's VLLM (it sets its own); nnterp's engine "
            "class (nnterp.backends.internals.engine_class) picks its CPU worker itself"
        )
    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "kv_cache_memory_bytes": DEFAULT_KV_CACHE_BYTES,
        "max_model_len": DEFAULT_MAX_MODEL_LEN,
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }
    kwargs.update(user_kwargs)
    return kwargs


def bind_cpu_threads(ranks: int) -> None:
    """Give each of ``ranks`` CPU workers its own share of this process's cores.

    vLLM's automatic binding puts each tensor-parallel worker on its own NUMA node and
    refuses to start when there are fewer nodes than workers (a one-socket machine,
    a container). Splitting the allowed cores into contiguous shares instead works
    everywhere. A binding the user set in ``VLLM_CPU_OMP_THREADS_BIND`` is kept; the
    engine's processes inherit the variable.
    """
    import os

    if ranks < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size={ranks} on CPU needs at least {ranks} cores; "
                         f"this process may use {len(cores)}")
    share = len(cores) // ranks
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(str(core) for core in cores[rank * share:(rank + 1) * share]) for rank in range(ranks))


def _empty_cache_noop(*args: Any, **kwargs: Any) -> None:
    """Stand-in for ``torch.accelerator.empty_cache`` on a host with no accelerator."""


def load_cpu_vllm(model: str, engine_cls: Any, **kwargs: Any) -> Any:
    """Build a dispatched ``engine_cls`` (nnterp's subclass of nnsight's ``VLLM``, which
    picks the CPU worker) on CPU, with `cpu_engine_kwargs`. nnsight builds its meta
    model of the engine while the accelerator cache is a no-op."""
    kwargs.setdefault("dispatch", True)
    bind_cpu_threads(int(kwargs.get("tensor_parallel_size") or 1))
    with _no_accelerator_cache():
        return engine_cls(model, **cpu_engine_kwargs(**kwargs))


#: How long `shutdown_vllm` lets the engine's processes exit before vLLM kills them.
#: vLLM's own default is 5 s for the engine core, which itself waits up to 5 s for its
#: workers: on a busy 2-core machine an engine that is exiting normally took 5-7 s (the
#: worker about 3 s after its queues closed, the engine core about 2 s more), and was
#: force-killed. The wait ends as soon as the processes have exited.
SHUTDOWN_TIMEOUT_S = 60.0


def shutdown_vllm(model: Any, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Stop the engine behind an nnsight ``VLLM`` and reap its process.

    ``LLM`` has no ``close``; the V1 ``LLMEngine`` owns an ``EngineCoreClient``
    whose ``shutdown`` terminates the engine-core process (and its workers),
    waiting up to ``timeout`` seconds for them to exit before killing them.
    """
    import gc
    import inspect

    llm = getattr(model, "vllm_entrypoint", None)
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", llm)
    client = getattr(engine, "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        # a client without a timeout parameter (older vLLM) waits vLLM's default
        with _no_accelerator_cache():
            if "timeout" in inspect.signature(client.shutdown).parameters:
                client.shutdown(timeout=timeout)
            else:
                client.shutdown()
    model.vllm_entrypoint = None
    del llm, engine, client
    gc.collect()


@contextlib.contextmanager
def _no_accelerator_cache() -> Iterator[None]:
    """``torch.accelerator.empty_cache`` as a no-op, on a CPU-only host, for the duration.

    vLLM empties the accelerator's cache where a CPU-only torch raises: after building
    nnsight's meta model in this process (`load_cpu_vllm`), and when the worker of
    an engine run in this process shuts down (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
    test suite's shared engines). In a worker process vLLM's CPU runner has already made
    it a no-op. Reentrant, and safe from several threads.
    """
    global _noop_depth, _saved_empty_cache
    if not is_cpu_only():
        yield
        return
    with _noop_lock:  # engines may shut down from several threads at once
        if _noop_depth == 0:
            _saved_empty_cache = torch.accelerator.empty_cache
            torch.accelerator.empty_cache = _empty_cache_noop
        _noop_depth += 1
    try:
        yield
    finally:
        with _noop_lock:
            _noop_depth -= 1
            if _noop_depth == 0:
                torch.accelerator.empty_cache = _saved_empty_cache


_noop_lock = threading.Lock()
_noop_depth = 0
_saved_empty_cache: Any = None
