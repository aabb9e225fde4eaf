"""``project.db``: the one way async code reaches the ORM. A call runs in a thread that
cannot be interrupted, so a cancelled caller leaves it running; ``drain`` is how whoever
stops work waits for those calls (on PostgreSQL one still running at a test's teardown
made the next ``TRUNCATE`` deadlock)."""
from __future__ import annotations

import ast
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections

from project import db, runtime
from sessions_app.agents.pool import Pool
from tests import runtime_control


def _blocking() -> tuple[threading.Event, threading.Event, list[str], Any]:
    """A database call that waits for ``release``; ``ended`` records that it finished."""
    started, release, ended = threading.Event(), threading.Event(), []

    def call() -> None:
        started.set()
        assert release.wait(10)
        ended.append("ended")

    return started, release, ended, call


async def _wait(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the call never started")


async def test_a_cancelled_call_runs_on_and_drain_waits_until_it_ends() -> None:
    started, release, ended, call = _blocking()
    caller = asyncio.get_running_loop().create_task(db.off_loop(call)())
    await _wait(started)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert db.in_flight() >= 1
    assert await db.drain(timeout=0.2) is False  # still running in its thread
    draining = asyncio.get_running_loop().create_task(db.drain(timeout=10))
    await asyncio.sleep(0.1)
    assert not draining.done()
    release.set()
    assert await draining is True
    assert ended == ["ended"]


async def test_a_call_cancelled_before_a_thread_took_it_never_runs() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))  # this test's loop only
    started, release, ended, first = _blocking()
    second_ran: list[bool] = []
    running = loop.create_task(db.off_loop(first)())
    await _wait(started)
    queued = loop.create_task(db.off_loop(lambda: second_ran.append(True))())
    await asyncio.sleep(0.05)  # submitted, waiting behind the first for the one thread
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    await running
    assert await db.drain(timeout=5) is True
    assert ended == ["ended"] and second_ran == []


@pytest.mark.django_db(transaction=True)
async def test_each_call_closes_its_connection_when_it_ends() -> None:
    def query() -> Any:
        get_user_model().objects.count()
        connection = connections["default"]
        assert connection.connection is not None  # open while the call runs
        return connection

    connection = await db.off_loop(query)()
    assert connection.connection is None


@pytest.mark.parametrize("stop", ["stop", "drain"])
async def test_the_pool_returns_from_stopping_runs_only_once_their_database_calls_ended(stop: str) -> None:
    started, release, ended, call = _blocking()
    pool = Pool(runtime.current())
    pool.serving = None
    task = asyncio.get_running_loop().create_task(db.off_loop(call)())
    pool.tasks["msg_x"] = task
    await _wait(started)
    # Stopping cancels the run (the tests' stop) or gives up waiting for it (drain): either way
    # its call goes on in its thread, and the pool must not return before it ends.
    stopping = asyncio.get_running_loop().create_task(
        runtime_control.stop(pool) if stop == "stop" else pool.drain(timeout=0.05)
    )
    await asyncio.sleep(0.3)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert ended == ["ended"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_production_code_reaches_the_orm_only_through_off_loop() -> None:
    # database_sync_to_async would put a call back on the shared thread, untracked by
    # drain; plain sync_to_async is for blocking calls that are not database work (Redis),
    # in the modules that make them. A new use elsewhere must choose one of the two.
    # (project/handler.py, Django's request path, runs a whole request in one call on its
    # own threads with the loop's run_in_executor, as off_loop does, and closes its
    # connections there as Django closes them: request_started/request_finished.)
    redis_only = {"events_app/streams.py", "events_app/presence.py", "project/liveness.py"}
    root = Path(__file__).resolve().parent.parent
    found: dict[str, set[str]] = {}
    for package in ("project", "events_app", "sessions_app", "tandem_client"):
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = {
                alias.name
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names
                if node.module in {"channels.db", "asgiref.sync"}
            }
            if names:
                found[str(path.relative_to(root))] = names
    assert all("database_sync_to_async" not in names for names in found.values()), found
    assert {path for path, names in found.items() if "sync_to_async" in names} <= redis_only
    assert "project/liveness.py" in found  # the scan sees imports at all
