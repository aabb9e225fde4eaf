"""Which processes are alive, as every process sees it through Redis.

Each server process and each agents worker beats every ``TANDEM_LIVENESS_SECONDS / 5``
into a sorted set of its kind (member = the process, score = when it counts as dead
unless it beats again). A process killed with SIGKILL stops beating, so within
``TANDEM_LIVENESS_SECONDS`` the others know:

- ``servers``: the per-user stream limit ignores the slots of a dead server process
  (project.limits), so its users can reconnect elsewhere at once instead of waiting for
  the slots' own expiry (``TANDEM_PRESENCE_TTL_SECONDS``).
- ``workers``: ``/readyz`` and ``/metrics`` report how many agents workers are alive.

Without Redis there is one server process and no separate worker to watch.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

import redis
from asgiref.sync import sync_to_async
from django.conf import settings

from project import redisconn

log = logging.getLogger(__name__)

def _new_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


# This process, as the other processes see it (its stream slots are named after it).
PROCESS_ID = _new_id()


def _after_fork() -> None:
    # A server forked after import (a pre-loading process manager) is a process of its own.
    global PROCESS_ID
    PROCESS_ID = _new_id()


os.register_at_fork(after_in_child=_after_fork)

_client: redis.Redis | None = None
_client_for: str | None = None


def _redis() -> redis.Redis:
    global _client, _client_for
    if _client is None or _client_for != settings.REDIS_URL:
        # Short timeouts: a hung Redis must not hold a probe or a scrape for long.
        _client = redisconn.client(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        _client_for = settings.REDIS_URL
    return _client


def key(kind: str) -> str:
    return f"{settings.TANDEM_CHANNEL_PREFIX}:alive:{kind}"


def ttl() -> float:
    return float(settings.TANDEM_LIVENESS_SECONDS)


def beat(kind: str, member: str | None = None) -> None:
    now = time.time()
    pipe = _redis().pipeline(transaction=False)
    pipe.zadd(key(kind), {member or PROCESS_ID: now + ttl()})
    # Members that stopped beating a while ago: nobody asks about them any more.
    pipe.zremrangebyscore(key(kind), "-inf", now - 10 * ttl())
    pipe.execute()


def forget(kind: str, member: str | None = None) -> None:
    """A process stopping cleanly says so rather than waiting to lapse."""
    _redis().zrem(key(kind), member or PROCESS_ID)


def alive(kind: str) -> list[str]:
    """The members of ``kind`` that beat recently. Raises when Redis is unreachable."""
    names = _redis().zrangebyscore(key(kind), time.time(), "+inf")
    return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)


async def beat_forever(kind: str = "servers", member: str | None = None) -> None:
    if not settings.REDIS_URL:
        return
    interval = ttl() / 5
    beating = sync_to_async(beat, thread_sensitive=False)
    down = False
    while True:
        try:
            await beating(kind, member)
            if down:
                log.info("Liveness beats to Redis resumed (%s)", kind)
            down = False
        except Exception:  # Redis down: try again; others treat us as gone meanwhile
            if not down:
                log.warning("Cannot reach Redis to beat (%s); retrying", kind)
            down = True
        await asyncio.sleep(interval)
