"""Many callers, one round trip: ``await batcher.submit(item)`` from any number of tasks,
and ``run`` handles every item submitted meanwhile in one call.

A burst of stream opens is the case it is made for: a thousand clients arriving at once
each need a database lookup and a Redis script. One thread hop (or Redis pipeline) each
costs more in hops, futures and connection set-up than the work itself, and a thread
pool of a few threads serialises them. Here the first item starts a run at once (after
the current loop turn, so the callers woken in that turn join it); items arriving while
a run is in flight wait for the next, which takes them all. At most one run is in flight
per batcher, so the batch grows with the load and the latency of a lone caller stays one
round trip.

``run`` answers each item with its result or an exception (for that caller alone); if
``run`` itself raises, every caller of that batch gets the exception. A caller that is
cancelled stops waiting; its item is still handled (the batch cannot be taken apart).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")


class Batcher(Generic[I, R]):
    def __init__(
        self, name: str, run: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]],
        *, limit: int = 2000,
    ) -> None:
        self.name = name
        self._run = run
        self._limit = limit  # items per run: bounds one statement's IN list
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # how many runs so far (tests and metrics read it)

    async def submit(self, item: I) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start, loop)
        return await future

    async def submit_many(self, items: Sequence[I]) -> list[R]:
        """``submit`` for several items at once, handled in the order given."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        if futures and not self._busy:
            self._busy = True
            loop.call_soon(self._start, loop)
        return list(await asyncio.gather(*futures))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending[: self._limit], self._pending[self._limit:]
        # Kept here: a loop holds only weak references to its tasks.
        self._task = loop.create_task(self._handle(batch), name=f"tandem-batch-{self.name}")
        self._task.add_done_callback(lambda _: self._start(loop))

    async def _handle(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.runs += 1
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every caller gets it, whatever it is
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
