"""project.batch.Batcher: many callers, one round trip each batch."""
from __future__ import annotations

import asyncio

import pytest

from project.batch import Batcher


async def test_callers_arriving_together_or_meanwhile_share_runs() -> None:
    runs: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        await gate.wait()
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher("t", run)
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)  # the first run starts with what arrived in that turn
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in range(3, 8)]
    gate.set()
    assert await asyncio.gather(*first, *later) == [i * 10 for i in range(8)]
    assert runs == [[0, 1, 2], [3, 4, 5, 6, 7]]


async def test_an_item_error_fails_that_caller_alone() -> None:
    async def run(items: list[int]) -> list[int | BaseException]:
        return [ValueError(i) if i == 2 else i for i in items]

    batcher: Batcher[int, int] = Batcher("t", run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ValueError)


async def test_a_failed_run_fails_every_caller_of_it_and_the_next_run_goes_on() -> None:
    calls = 0

    async def run(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return items

    batcher: Batcher[int, int] = Batcher("t", run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await batcher.submit(7) == 7


async def test_a_cancelled_caller_does_not_break_its_batch() -> None:
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    batcher: Batcher[int, int] = Batcher("t", run)
    gone = asyncio.ensure_future(batcher.submit(1))
    stays = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    gate.set()
    assert await stays == 2
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_runs_are_bounded_by_the_limit() -> None:
    sizes: list[int] = []

    async def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    batcher: Batcher[int, int] = Batcher("t", run, limit=4)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == list(range(10))
    assert sizes == [4, 4, 2]


async def test_many_items_submitted_at_once_are_handled_in_order_with_single_items() -> None:
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return [-i for i in items]

    batcher: Batcher[int, int] = Batcher("t", run, limit=3)
    single = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    assert await batcher.submit_many([1, 2, 3, 4]) == [-1, -2, -3, -4]
    assert await single == 0
    assert runs == [[0, 1, 2], [3, 4]]
    assert await batcher.submit_many([]) == []
