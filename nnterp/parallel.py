"""Data parallelism: one run's requests spread over several engines, on one host or many.

`DataParallel` is a model made of *replicas* of one model, each an engine of its own.
``run``, ``run_batch``, a streamed run and the function API take it as they take a
`StandardizedTransformer`: it describes the model (tokenizer, sizes, engine limits,
identity) as its first replica does, and it runs a call by splitting every job's
prompts into one contiguous part per replica, running the parts at once, and joining
the results in order. Each part keeps its prompts' rows in the run (`Prompts.first`),
so on vLLM, which seeds each request from its row, a seeded sample is the one a single
engine gives (HF seeds a whole batch, so its samples depend on how a run is batched).

Two kinds of replicas:

* `DataParallel.on_gpus`: one vLLM engine per GPU of this host, each with tensor
  parallelism inside it as usual. vLLM's own ``LLM(data_parallel_size=N)`` refuses to
  run in one process (vLLM 0.32: "not supported for single-process usage and may
  hang"), and nnterp's executor installs its plans through each engine's workers, so
  the engines are independent: one per GPU (or per ``tensor_parallel_size`` GPUs).
* `DataParallel.on_ray`: Ray actors, each owning an engine, placed by Ray on any host of
  its cluster. Ray restarts an actor that dies and retries its call (an execution has
  no state, so a retry is the same call); with ``out=DIR``, a retried shard is written
  to the same file, so a rerun is idempotent.

Replicas run their parts from threads of this process: each call waits on an engine in
another process (vLLM's engine core, or a Ray actor), so the threads only wait.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Sequence

from nnterp.dsl.plan import Prompts
from nnterp.dsl.recorded import Execution, join_recorded
from nnterp.dsl.spec import DescribedModel, ModelSpec

__all__ = ["DataParallel"]


class DataParallel(DescribedModel):
    """A model whose runs are split across ``replicas``: loaded vLLM models, or handles of
    Ray actors (`on_ray`), all of the same model. Use `on_gpus` or `on_ray` to build one.

    Example:
        >>> model = DataParallel.on_gpus("meta-llama/Llama-3.1-8B", gpus=8)    # doctest: +SKIP
        >>> run(Lens(top_k=5), model, prompts, out="lens/")                     # doctest: +SKIP
    """

    def __init__(self, replicas: Sequence[Any], spec: ModelSpec, tokenizer: Any, identity: dict) -> None:
        if not replicas:
            raise ValueError("DataParallel needs at least one replica")
        super().__init__(spec, tokenizer, identity)
        self.replicas = list(replicas)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.replicas),
                                                           thread_name_prefix="nnterp-replica")
        self._lock = threading.Lock()

    # -- building --------------------------------------------------------------------------

    @classmethod
    def on_gpus(cls, name_or_path: str, gpus: int | Sequence[int] | None = None, **kwargs: Any) -> "DataParallel":
        """One vLLM engine per group of ``tensor_parallel_size`` GPUs of this host.

        Args:
            gpus: how many GPUs, or which (CUDA indices); default every visible GPU.
            **kwargs: `StandardizedTransformer`'s arguments for each engine.
        """
        import torch

        from nnterp.standardized import StandardizedTransformer

        if gpus is None:
            gpus = torch.cuda.device_count()
        devices = list(range(gpus)) if isinstance(gpus, int) else list(gpus)
        per = int(kwargs.get("tensor_parallel_size", 1))
        if not devices or len(devices) % per:
            raise ValueError(f"DataParallel.on_gpus: {len(devices)} GPUs do not split into engines of "
                             f"tensor_parallel_size={per}")
        kwargs.setdefault("backend", "vllm")
        if kwargs["backend"] != "vllm":
            raise ValueError("DataParallel.on_gpus runs vLLM engines (backend='vllm'); an HF model spreads "
                             "over GPUs with device_map='auto'")
        replicas = []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for start in range(0, len(devices), per):
                # an engine's processes are spawned while it starts, and see the GPUs
                # this process shows them then
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, _physical(devices[start:start + per],
                                                                                 visible)))
                replicas.append(StandardizedTransformer(name_or_path, **kwargs))
        except BaseException:
            for replica in replicas:
                replica.close()
            raise
        finally:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        first = replicas[0]
        return cls(replicas, ModelSpec.from_model(first), first.tokenizer, first.identity())

    @classmethod
    def on_ray(cls, name_or_path: str, replicas: int, *, num_gpus: float = 1.0, num_cpus: float = 1.0,
               max_restarts: int = 2, **kwargs: Any) -> "DataParallel":
        """``replicas`` Ray actors, each loading ``name_or_path`` with ``kwargs`` (its own
        engine; ``backend="vllm"`` unless given), placed by Ray on the cluster ``ray.init``
        connected to (started here, local, when none is).

        Args:
            num_gpus, num_cpus: resources of each actor (``num_gpus=0`` on CPU hosts).
            max_restarts: how often Ray restarts an actor that dies; its call is retried
                as often.
        """
        import ray

        kwargs.setdefault("backend", "vllm")
        if not ray.is_initialized():
            ray.init()
        actor = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                           max_task_retries=max_restarts)(EngineActor)
        handles = [actor.remote(name_or_path, kwargs) for _ in range(replicas)]
        spec, tokenizer, identity = ray.get(handles[0].describe.remote())
        ray.get([handle.describe.remote() for handle in handles[1:]])  # every engine is up
        return cls([_RayReplica(handle) for handle in handles], spec, tokenizer, identity)

    # -- running ---------------------------------------------------------------------------

    def execute_many(self, jobs: Sequence[tuple[Any, Any, Any]]) -> list[Execution]:
        """Every job split into one part per replica (contiguous prompts), the replicas
        run at once, and each job's parts joined in order."""
        n = len(self.replicas)
        tokenized = [(plan, Prompts.of(prompts, self.tokenizer), sampling) for plan, prompts, sampling in jobs]
        shares: list[list[tuple[Any, Prompts, Any]]] = [[] for _ in range(n)]
        spans: list[list[tuple[int, int]]] = []
        for plan, prompts, sampling in tokenized:
            bounds = [len(prompts) * k // n for k in range(n + 1)]
            spans.append([(bounds[k], bounds[k + 1]) for k in range(n)])
            for k in range(n):
                if bounds[k + 1] > bounds[k]:
                    shares[k].append((plan, prompts.part(bounds[k], bounds[k + 1]), sampling))
        with self._lock:  # one call at a time: each engine runs one call's parts
            futures = [self._pool.submit(replica.execute_many, share) if share else None
                       for replica, share in zip(self.replicas, shares)]
            # every part ends before this call does, even when one fails: an engine
            # still running a part when the next call starts would mix the two
            concurrent.futures.wait([f for f in futures if f is not None])
            done = [future.result() if future is not None else [] for future in futures]
        executions = []
        taken = [0] * n
        for job, span in enumerate(spans):
            parts = []
            for k, (start, stop) in enumerate(span):
                if stop > start:
                    parts.append((start, done[k][taken[k]]))
                    taken[k] += 1
            executions.append(_joined(parts))
        return executions

    def close(self) -> None:
        """Stop every replica's engine; idempotent."""
        for replica in self.replicas:
            replica.close()
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"DataParallel({len(self.replicas)} replicas, backend={self.spec.backend!r})"


def _joined(parts: list[tuple[int, Execution]]) -> Execution:
    if len(parts) == 1 and parts[0][0] == 0:
        return parts[0][1]
    stats: dict[str, int] = {}
    for _, execution in parts:
        for key, value in execution.stats.items():
            stats[key] = stats.get(key, 0) + value
    return Execution(join_recorded([(start, execution.values) for start, execution in parts]),
                     [row for _, execution in parts for row in execution.tokens], parts[0][1].executor,
                     stats=stats)


def _physical(devices: list[int], visible: str | None) -> list[str]:
    """CUDA indices as this process sees them, in the numbering of the host (or of the
    ``CUDA_VISIBLE_DEVICES`` this process was started with)."""
    if not visible:
        return [str(d) for d in devices]
    shown = [v.strip() for v in visible.split(",") if v.strip()]
    return [shown[d] for d in devices]


class EngineActor:
    """One replica on Ray: an engine in the actor's process (`DataParallel.on_ray`)."""

    def __init__(self, name_or_path: str, kwargs: dict) -> None:
        from nnterp.standardized import StandardizedTransformer

        self.model = StandardizedTransformer(name_or_path, **kwargs)

    def describe(self) -> tuple[ModelSpec, Any, dict]:
        return ModelSpec.from_model(self.model), self.model.tokenizer, self.model.identity()

    def execute_many(self, jobs: Sequence[tuple[Any, Any, Any]]) -> list[Execution]:
        return self.model.execute_many(jobs)

    def close(self) -> None:
        self.model.close()


class _RayReplica:
    """A Ray actor handle with a replica's methods, each a blocking call."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def execute_many(self, jobs: Sequence[tuple[Any, Any, Any]]) -> list[Execution]:
        import ray

        return ray.get(self.handle.execute_many.remote(jobs))

    def close(self) -> None:
        import ray

        try:
            ray.get(self.handle.close.remote())
        finally:
            ray.kill(self.handle)
