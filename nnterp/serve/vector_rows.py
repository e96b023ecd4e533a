"""The engine's table of edit vectors, shared by every request a server has in flight.

Each installed plan takes rows of one fixed table on the device (its steering vectors,
its patch rows and their compositions; `nnterp.dsl.rules.vector_rows_bound`). A local
``run`` cuts its plans into waves that fit (`nnterp.dsl.jobs.waves`); a server installs
plans as requests arrive, from clients that know nothing of each other, and a table
that ran out mid-step would fail the engine's step, every client's. So a request
reserves its plan's rows before the plan is installed and gives them back once it is
collected: when the table is full, the request waits for rows, first come first
served, instead of failing or failing others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

__all__ = ["VectorRowBudget"]


class VectorRowBudget:
    """Rows of the engine's vector table not reserved by a request in flight.

    Used from the server's event loop only.

    Args:
        rows: the table's rows that plans may use (its size less the zero row).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.free = rows
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> None:
        """Reserve ``n`` rows (at most the table's), waiting behind earlier requests."""
        n = min(n, self.rows)
        if not self._waiting and self.free >= n:
            self.free -= n
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((n, granted))
        try:
            await granted
        except asyncio.CancelledError:  # the client went away while it waited
            if granted.done() and not granted.cancelled():
                self.release(n)  # granted in the same turn it was cancelled
            else:
                self._waiting.remove((n, granted))
                self._grant()  # it may have held back smaller requests behind it
            raise

    def release(self, n: int) -> None:
        """Give back rows an `acquire` reserved."""
        self.free += min(n, self.rows)
        self._grant()

    @contextlib.asynccontextmanager
    async def held(self, n: int) -> AsyncIterator[None]:
        """``n`` rows for the duration of the block."""
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    def _grant(self) -> None:
        # in order of arrival: a large request is not passed forever by small ones
        while self._waiting and self._waiting[0][0] <= self.free:
            n, granted = self._waiting.popleft()
            if granted.cancelled():
                continue
            self.free -= n
            granted.set_result(None)
