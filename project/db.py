"""The one way async code reaches the ORM: ``await off_loop(func)(*args)``.

``func`` is a plain synchronous function that does all of one unit of database work
(its own ``transaction.atomic`` included); it runs on the event loop's thread pool, not
on asgiref's one shared "thread-sensitive" thread, where every stream, agent run and
command of the process would queue behind each other and behind REST requests.
Connections are handled as Django handles them around a request (``close_old_connections``
before and after each call), so no idle stream or run holds one.

A caller cancelled while its call runs does not wait for it: the call finishes in its
thread, and its connection is closed after it like any other.

Blocking calls that are not database work (Redis) use ``asgiref.sync.sync_to_async(...,
thread_sensitive=False)`` directly: they need no connection handling.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async

P = ParamSpec("P")
R = TypeVar("R")


def off_loop(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    return database_sync_to_async(func, thread_sensitive=False)  # type: ignore[no-any-return]
