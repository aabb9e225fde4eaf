"""The one way async code reaches the ORM: ``await off_loop(func)(*args)``.

``func`` is a plain synchronous function that does all of one unit of database work
(its own ``transaction.atomic`` included); it runs on the event loop's thread pool, not
on asgiref's one shared "thread-sensitive" thread, where every stream, agent run and
command of the process would queue behind each other and behind REST requests.
Connections are handled as Django handles them around a request (``close_old_connections``
before and after each call), so no idle stream or run holds one.

A thread cannot be interrupted: a caller cancelled while its call runs stops waiting,
but the call goes on in its thread, holding its connection and any locks until it ends.
So every call is tracked from the moment it is submitted until its connection is closed,
and ``drain`` waits for the ones in flight. Whoever stops work that uses the database
awaits it after cancelling that work: the agents' pool when it stops its runs, the ASGI
lifespan shutdown, and through the pool the tests' teardown (on PostgreSQL a call still
running there held row locks that the next test's ``TRUNCATE`` deadlocked on). A call
cancelled before its thread picked it up never runs.

Blocking calls that are not database work (Redis) use ``asgiref.sync.sync_to_async(...,
thread_sensitive=False)`` directly: they need no connection handling.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from django.db import close_old_connections

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Every call submitted and not yet over (its connection closed), from any loop or thread
# of the process. A concurrent Future per call: "running" once its thread took it up,
# done when it ends, cancelled if it never started.
_lock = threading.Lock()
_in_flight: set[concurrent.futures.Future[None]] = set()


def _forget(ticket: concurrent.futures.Future[None]) -> None:
    with _lock:
        _in_flight.discard(ticket)


def off_loop(func: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(func)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        ticket: concurrent.futures.Future[None] = concurrent.futures.Future()
        ticket.add_done_callback(_forget)
        with _lock:
            _in_flight.add(ticket)

        def in_thread() -> R | None:
            if not ticket.set_running_or_notify_cancel():
                return None  # its caller was cancelled before a thread took it up
            try:
                close_old_connections()
                try:
                    return func(*args, **kwargs)
                finally:
                    close_old_connections()
            finally:
                ticket.set_result(None)

        try:
            # The loop's own executor, as asgiref's sync_to_async(thread_sensitive=False)
            # uses, without its per-call bookkeeping (copying every context variable back
            # after each call cost the agents worker 4 % of its CPU): a call sees the
            # caller's context and changes none of it. Never None here: that is returned
            # only to a caller that was cancelled.
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()
            result = await loop.run_in_executor(None, functools.partial(context.run, in_thread))
            return result  # type: ignore[return-value]
        finally:
            # Cancelled or failed before a thread took it up: it never will. Once it runs,
            # cancel() is refused and the call stays in flight until it ends.
            ticket.cancel()

    return call


def in_flight() -> int:
    """How many database calls are submitted and not yet over."""
    with _lock:
        return len(_in_flight)


async def drain(timeout: float = 10.0) -> bool:
    """Wait (up to ``timeout`` seconds) until every database call in flight now has
    ended and closed its connection; True if they all have. Calls made meanwhile are not
    waited for: stop whatever makes them first."""
    with _lock:
        pending = list(_in_flight)
    if not pending:
        return True
    loop = asyncio.get_running_loop()
    waiters = []
    for ticket in pending:
        waiter = loop.create_future()
        ticket.add_done_callback(functools.partial(_wake, loop, waiter))
        waiters.append(waiter)
    _, left = await asyncio.wait(waiters, timeout=timeout)
    if left:
        log.warning("%d database call(s) still running after %.1f s", len(left), timeout)
    return not left


def _wake(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], _: object) -> None:
    # Runs in the call's thread (or at once, if it is already over). The drain's loop may
    # have gone away since: nobody is waiting then.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
