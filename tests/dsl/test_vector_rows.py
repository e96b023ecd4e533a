"""The vector rows a plan may take, and the server's reservation of them: plain data and a
real event loop, no model."""

from __future__ import annotations

import asyncio

import torch

from nnterp.dsl import Graph, Patch, Steer, Zero
from nnterp.dsl.lowering import lower
from nnterp.dsl.rules import plan_vector_rows_bound, vector_rows_bound
from nnterp.serve.vector_rows import VectorRowBudget


def test_a_plan_bounds_its_rows_as_its_graph_does(spec):
    graphs = [
        Graph([Steer(1, torch.ones(8))]),
        Graph([Steer(1, torch.ones(8)), Steer(1, torch.ones(8), scale=2.0), Steer(2, torch.ones(8))]),
        Graph([Zero("layers[0].output"), Steer(0, torch.ones(8))]),
        Graph([Patch("layers[3].output", value=torch.ones(3, 8), positions=[0, 1, 2]), Steer(3, torch.ones(8))]),
    ]
    for graph in graphs:
        assert plan_vector_rows_bound(lower(graph, spec)) == vector_rows_bound(graph), graph
    assert [vector_rows_bound(g) for g in graphs] == [1, 3 + 1, 3, 4 * 2 - 1]


def test_requests_wait_for_rows_in_order_of_arrival_and_a_cancelled_wait_gives_way():
    async def scenario() -> list:
        budget = VectorRowBudget(10)
        order: list = []

        async def request(name: str, rows: int, hold: float) -> None:
            async with budget.held(rows):
                order.append((name, budget.free))
                await asyncio.sleep(hold)

        first = asyncio.create_task(request("a", 8, 0.05))
        await asyncio.sleep(0)
        big = asyncio.create_task(request("big", 9, 0.0))  # waits for a
        await asyncio.sleep(0)
        small = asyncio.create_task(request("small", 1, 0.0))  # fits now, but arrived after big
        gone = asyncio.create_task(request("gone", 5, 0.0))
        await asyncio.sleep(0.01)
        assert [name for name, _ in order] == ["a"]
        gone.cancel()
        await asyncio.gather(first, big, small, return_exceptions=True)
        assert gone.cancelled()
        huge = asyncio.create_task(request("huge", 50, 0.0))  # more than the table: the whole table
        await huge
        return order + [("end", budget.free)]

    # small fitted beside a, but big came first: they start together once a is done
    assert asyncio.run(scenario()) == [("a", 2), ("big", 0), ("small", 0), ("huge", 0), ("end", 10)]
