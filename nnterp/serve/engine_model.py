"""The served engine as a model the DSL runs on: ``run(graph, EngineModel, prompts)``.

A server's engine is vLLM's asynchronous one (``AsyncLLM``), driven by the server's
event loop; ``nnterp.dsl.run`` is synchronous. The run endpoint therefore calls ``run``
in a worker thread, with this model: it describes the served model (spec, tokenizer,
identity) and its ``execute_many`` hands the plans to the event loop
(`nnterp.backends.vllm_execute.execute_async_many`), whose requests join the engine's
running batches with every other client's. Validation, sources, grouping, assembly and
the manifest are the DSL's own: a result from the server is built as a local one is.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from nnterp.dsl.spec import DescribedModel, ModelSpec
from nnterp.serve.vector_rows import VectorRowBudget

__all__ = ["EngineModel"]


class EngineModel(DescribedModel):
    """The DSL's view of an ``AsyncLLM`` engine serving ``name_or_path``.

    Args:
        engine: the engine client (``AsyncLLM``).
        loop: the event loop that drives it (the server's).
        spec: the served model's `ModelSpec` (backend ``"vllm"``).
        tokenizer: its tokenizer.
        identity: its identity (`nnterp.standardized.model_identity`).
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, spec: ModelSpec, tokenizer: Any,
                 identity: dict) -> None:
        super().__init__(spec, tokenizer, identity)
        self.engine, self.loop = engine, loop
        #: the engine's vector table, as every request in flight reserves it
        self.rows = VectorRowBudget(spec.vector_rows - 1)

    def execute_many(self, jobs: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
        """Run the plans on the engine, from a thread other than the loop's, once their
        vector rows are reserved (`nnterp.serve.vector_rows`)."""
        from nnterp.backends.vllm_execute import execute_async_many
        from nnterp.dsl.rules import plan_vector_rows_bound

        need = min(sum(plan_vector_rows_bound(plan) for plan, _, _ in jobs), self.rows.rows)

        async def execute() -> list[Any]:
            async with self.rows.held(need):
                return await execute_async_many(self.engine, self.tokenizer, jobs)

        return asyncio.run_coroutine_threadsafe(execute(), self.loop).result()
