"""What the tests do to the process's runtimes (``project/runtime.py``) and nothing in
production does: start each test on fresh runtimes, and stop the replies a test started
before the next one begins.

One process runs many tests, each async test on a loop of its own, and synchronous tests
hand their work to the runtime thread's loop, which lives as long as the process. A test
never resets a module's state: it discards the runtimes, and the next use of a loop
builds a new one from the settings of the moment (the channel layer, Redis or not)."""
from __future__ import annotations

import asyncio

from project import runtime
from project.db import drain as drain_database_calls
from sessions_app.agents.pool import POOL, Pool


def _other_runtimes() -> list[runtime.Runtime]:
    """Every runtime except the one of the caller's running loop, if any."""
    try:
        mine = asyncio.get_running_loop()
    except RuntimeError:
        mine = None
    return [rt for rt in runtime.every() if rt.loop is not mine]


def stop_replies(timeout: float = 10.0) -> None:
    """Stop the replies running on loops other than the caller's without ending them,
    and wait for them: a reply must not outlive the test that started it, nor write into
    the next test's database."""
    for rt in _other_runtimes():
        pool = POOL.find(rt)
        if pool is None or not pool.tasks or not rt.loop.is_running():
            continue
        asyncio.run_coroutine_threadsafe(stop(pool), rt.loop).result(timeout)


async def stop(pool: Pool) -> None:
    for run in list(pool.runs.values()):
        run.abort(lost=True)  # lost: the row stays as it is, nothing is written on the way out
    tasks = list(pool.tasks.values())
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)
        # A cancelled run leaves its database call running in its thread (holding locks
        # until it ends): wait for it, within stop_replies' 10 s.
        await drain_database_calls(timeout=4)


def fresh_runtimes() -> None:
    """Discard every runtime but the caller's: no counts, slots, presence, hub
    subscriptions, pool or stopping flag carry over into what comes next (user ids are
    reused after a rollback, and a hub keeps the channel layer it was made with)."""
    stop_replies()
    for rt in _other_runtimes():
        rt.close()


async def close(rt: runtime.Runtime) -> None:
    """Discard ``rt`` (the caller's) and wait until every task it spawned has ended."""
    tasks = rt.tasks()
    rt.close()
    # A cancel that lands inside a redis-py command can be swallowed, so keep asking
    # (bounded) until every task has stopped.
    async with asyncio.timeout(5):
        while not all(task.done() for task in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.sleep(0.02)
