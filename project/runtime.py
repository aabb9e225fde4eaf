"""The process's runtime: the event loop that owns its long-lived async work, and one
``Runtime`` object per such loop holding everything the process keeps in memory while it
serves: the outbox and the hub, the open streams, the request gate, the local limit and
presence state, the agents pool and its replies.

Under an ASGI server the loop is the server's own: ``project.asgi`` builds its runtime at
start-up (lifespan startup, or the first request of a server without lifespan) with
``bind``, and so does ``manage.py run_agents``. Where no server runs (scripts, other
management commands, synchronous tests) a daemon thread runs a loop instead, started on
first use, so synchronous code (services called from DRF views) can always hand work to
one loop, in order, from any thread.

The runtime knows nothing of what it holds, because it sits in the lowest layer and the
modules whose state it holds sit above it. Each of them declares a ``Component`` (a name
and how to make it) and reaches its state through it; the component is made on first use
and lives as long as the runtime. Code running on a loop gets that loop's runtime
(``current``); a thread outside any loop (a request's view, a query handed off the loop)
gets the main loop's.

Tests run many loops in one process (one per async test, plus the thread's loop): each
loop has a runtime of its own, and ``Runtime.close`` ends one, so the next use of its loop
starts from nothing.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runtime:
    """What one loop serving the app holds: its components and the tasks spawned on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # The server is stopping: open streams end, and one that opens ends at once.
        self.stopping = False
        self._components: dict[Component[Any], Any] = {}
        # Components are made from any thread (limits from request threads, say).
        self._lock = threading.RLock()
        # A loop keeps only weak references to its tasks: these are the strong ones.
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Runtime {id(self):#x} on {self.loop!r}>"

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this runtime until it ends or ``close`` cancels it.
        From this runtime's loop only."""
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks spawned here that have not ended yet."""
        return [task for task in list(self._tasks) if not task.done()]

    def close(self) -> None:
        """End this runtime: every task spawned on it is cancelled, and the next use of
        its loop builds a new runtime. From any thread."""
        with _lock:
            if _runtimes.get(self.loop) is self:
                del _runtimes[self.loop]
        if self.loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop or not self.loop.is_running():
            self._cancel_tasks()
        else:
            self.loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class Component(Generic[T]):
    """One piece of state a module keeps per runtime, made by ``make(runtime)`` the first
    time it is asked for. Declared once, at module level, by the module that owns it."""

    def __init__(self, name: str, make: Callable[[Runtime], T]) -> None:
        self.name = name
        self._make = make

    def __repr__(self) -> str:
        return f"<Component {self.name}>"

    def get(self, runtime: Runtime | None = None) -> T:
        """This component of ``runtime`` (by default the caller's, ``current()``)."""
        rt = runtime if runtime is not None else current()
        try:
            return cast(T, rt._components[self])
        except KeyError:
            pass
        with rt._lock:
            if self not in rt._components:
                rt._components[self] = self._make(rt)
            return cast(T, rt._components[self])

    def find(self, runtime: Runtime) -> T | None:
        """This component of ``runtime`` if it has been made; never makes it."""
        return cast("T | None", runtime._components.get(self))


_lock = threading.Lock()
_bound: asyncio.AbstractEventLoop | None = None
_fallback: asyncio.AbstractEventLoop | None = None
_runtimes: dict[asyncio.AbstractEventLoop, Runtime] = {}


def _forget_after_fork() -> None:
    # A forked child (a Celery prefork worker, say) inherits the parent's loops and
    # runtimes but not the threads running them: it must start its own loop, not hand
    # work to a loop that will never run it.
    global _bound, _fallback, _lock, _runtimes
    _bound = _fallback = None
    _lock = threading.Lock()
    _runtimes = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def of(loop: asyncio.AbstractEventLoop) -> Runtime:
    """The runtime of ``loop``, built on first use."""
    runtime = _runtimes.get(loop)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = _runtimes.get(loop)
        if runtime is None:
            # The loops of finished tests are closed: their runtimes go with them.
            for closed in [other for other in _runtimes if other.is_closed()]:
                del _runtimes[closed]
            runtime = _runtimes[loop] = Runtime(loop)
        return runtime


def bind(loop: asyncio.AbstractEventLoop) -> Runtime:
    """Make ``loop`` (the server's) the process's main loop; returns its runtime."""
    global _bound
    _bound = loop
    return of(loop)


def current() -> Runtime:
    """The runtime of the running loop; outside any loop, the main loop's."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = main_loop()
    return of(loop)


def every() -> list[Runtime]:
    """Every runtime of this process whose loop is not closed (a server has one)."""
    return [runtime for loop, runtime in list(_runtimes.items()) if not loop.is_closed()]


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

