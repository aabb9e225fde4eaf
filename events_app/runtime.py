"""The event loop that owns this process's long-lived async work: the fan-out hub, the
outbox that sends to the channel layer, and agent runs.

Under an ASGI server that loop is the server's own (the ASGI entry point binds it on every
call). Where no server runs — management commands, synchronous tests — a daemon thread
runs a loop instead, so synchronous code (services called from DRF views) can always hand
work to one loop, in order, from any thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_bound: asyncio.AbstractEventLoop | None = None
_fallback: asyncio.AbstractEventLoop | None = None


def _forget_after_fork() -> None:
    # A forked child (a Celery prefork worker, say) inherits the parent's loop objects
    # but not the threads running them: it must start its own loop, not hand work to a
    # loop that will never run it.
    global _bound, _fallback, _lock
    _bound = _fallback = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def bind(loop: asyncio.AbstractEventLoop) -> None:
    global _bound
    _bound = loop


def bound_loop() -> asyncio.AbstractEventLoop | None:
    """The server's loop, if one is bound and running (never starts the fallback)."""
    return _bound if _usable(_bound) else None


def _usable(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and loop.is_running() and not loop.is_closed()


def main_loop() -> asyncio.AbstractEventLoop:
    global _fallback
    loop = _bound
    if _usable(loop):
        assert loop is not None
        return loop
    with _lock:
        if not _usable(_fallback):
            _fallback = asyncio.new_event_loop()
            ready = threading.Event()
            fallback = _fallback

            def run() -> None:
                asyncio.set_event_loop(fallback)
                fallback.call_soon(ready.set)
                fallback.run_forever()

            threading.Thread(target=run, name="tandem-runtime", daemon=True).start()
            ready.wait()
        assert _fallback is not None
        return _fallback


def in_main_loop() -> bool:
    try:
        return asyncio.get_running_loop() is main_loop()
    except RuntimeError:
        return False


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Run ``coro`` on the main loop from any thread; failures are logged, not lost."""
    # A fresh context: the caller's (say, a request thread's asgiref executor) must not
    # leak into a task that outlives it.
    future = contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, main_loop())
    future.add_done_callback(_log_failure)
    return future


def call_soon(callback: Any, *args: Any) -> None:
    """Schedule a plain callback on the main loop, keeping FIFO order across calls."""
    main_loop().call_soon_threadsafe(callback, *args, context=contextvars.Context())


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.error("Background task failed", exc_info=exc)
