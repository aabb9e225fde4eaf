"""Who is connected to a session now, across every server process.

Without Redis a process-local table is the whole truth. With Redis each session has a
hash of connection id -> entry; every entry carries its own expiry and is refreshed by the
process that owns it, so the connections of a killed process vanish within
``TANDEM_PRESENCE_TTL_SECONDS`` instead of staying forever.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from redis.exceptions import RedisError

from project import runtime
from project.batch import Batcher
from project.errors import Unavailable
from project.limits import STREAM_RETRY_AFTER, renew_stream_slots

Entry = dict[str, Any]  # {"user": {...}, "transport": "sse"|"ws", "state": {...}}
Write = tuple[str, str, Entry | None]  # session id, connection id, entry (None: remove it)


class LocalPresence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, dict[str, Entry]] = {}

    def put(self, session_id: str, connection_id: str, entry: Entry) -> None:
        with self._lock:
            self._sessions.setdefault(session_id, {})[connection_id] = entry

    def remove(self, session_id: str, connection_id: str) -> None:
        with self._lock:
            entries = self._sessions.get(session_id)
            if entries is not None:
                entries.pop(connection_id, None)
                if not entries:
                    del self._sessions[session_id]

    def entries(self, session_id: str) -> list[Entry]:
        with self._lock:
            return list(self._sessions.get(session_id, {}).values())

    def refresh(self, items: list[tuple[str, str, Entry]]) -> None:
        pass


class RedisPresence:
    def __init__(self, url: str) -> None:
        from project import redisconn

        # Short timeouts: a hung Redis must not hold a request (or its thread) for long.
        self._redis = redisconn.client(url, socket_timeout=2, socket_connect_timeout=2)
        self._url = url
        self._aredis: Any = None
        self._ttl = settings.TANDEM_PRESENCE_TTL_SECONDS
        # The channel layer's prefix: deployments sharing one Redis see only their own.
        self._prefix = str(settings.TANDEM_CHANNEL_PREFIX)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}:presence:{session_id}"

    def put(self, session_id: str, connection_id: str, entry: Entry) -> None:
        self.refresh([(session_id, connection_id, entry)])

    def refresh(self, items: list[tuple[str, str, Entry]]) -> None:
        if not items:
            return
        expires = time.time() + self._ttl
        pipe = self._redis.pipeline(transaction=False)
        for session_id, connection_id, entry in items:
            pipe.hset(self._key(session_id), connection_id, orjson.dumps({**entry, "exp": expires}))
            pipe.expire(self._key(session_id), self._ttl)
        pipe.execute()

    def remove(self, session_id: str, connection_id: str) -> None:
        self._redis.hdel(self._key(session_id), connection_id)

    def _async(self) -> Any:
        if self._aredis is None:
            from project import redisconn

            self._aredis = redisconn.async_client(self._url, socket_timeout=2, socket_connect_timeout=2)
        return self._aredis

    async def write_many(self, items: list[Write]) -> list[None]:
        """Puts (an entry) and removals (None), in the order given: one pipeline, from the loop."""
        expires = time.time() + self._ttl
        pipe = self._async().pipeline(transaction=False)
        for session_id, connection_id, entry in items:
            key = self._key(session_id)
            if entry is None:
                pipe.hdel(key, connection_id)
            else:
                pipe.hset(key, connection_id, orjson.dumps({**entry, "exp": expires}))
                pipe.expire(key, self._ttl)
        await pipe.execute()
        return [None] * len(items)

    def entries(self, session_id: str) -> list[Entry]:
        now = time.time()
        live, stale = [], []
        for connection_id, raw in self._redis.hgetall(self._key(session_id)).items():
            entry = orjson.loads(raw)
            if entry.pop("exp", 0) < now:
                stale.append(connection_id)
            else:
                live.append(entry)
        if stale:
            self._redis.hdel(self._key(session_id), *stale)
        return live


class _Presence:
    """A runtime's presence: the store, and its own connections, re-announced
    periodically so their entries stay alive."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.store = RedisPresence(settings.REDIS_URL) if settings.REDIS_URL else LocalPresence()
        self.local: dict[tuple[str, str], Entry] = {}
        # One queue for puts and removals alike: a stream that goes away while its entry
        # is still being written must not have its removal overtake that write (two
        # queues run on two connections, and the entry would outlive the stream).
        self.writes: Batcher[Write, None] | None = None
        if isinstance(self.store, RedisPresence):
            self.writes = Batcher("presence-write", self.store.write_many)


PRESENCE = runtime.Component("presence", _Presence)


def store() -> LocalPresence | RedisPresence:
    return PRESENCE.get().store


def _entries(session_id: str) -> list[Entry]:
    try:
        return store().entries(session_id)
    except RedisError:
        # Presence lives only in Redis: with Redis away there is no honest answer.
        raise Unavailable(
            "Presence is unavailable for a moment; retry shortly.",
            headers={"Retry-After": str(STREAM_RETRY_AFTER)},
        ) from None


def summary(session_id: str) -> list[dict[str, Any]]:
    """One row per user: how many connections, over which transports, latest state.
    Unavailable (503) while Redis is unreachable."""
    by_user: dict[int, dict[str, Any]] = {}
    for entry in _entries(session_id):
        user = entry["user"]
        row = by_user.setdefault(
            user["id"], {"user": user, "connections": 0, "transports": [], "state": {}}
        )
        row["connections"] += 1
        if entry["transport"] not in row["transports"]:
            row["transports"].append(entry["transport"])
        if entry.get("state"):
            row["state"] = entry["state"]
    return sorted(by_user.values(), key=lambda r: r["user"]["username"])


def connection_count(session_id: str) -> int | None:
    """None while Redis is unreachable: unknown, rather than a wrong zero."""
    try:
        return len(_entries(session_id))
    except Unavailable:
        return None


def _put(session_id: str, connection_id: str, entry: Entry) -> None:
    presence = PRESENCE.get()
    presence.local[(session_id, connection_id)] = entry
    presence.store.put(session_id, connection_id, entry)


def _remove(session_id: str, connection_id: str) -> None:
    presence = PRESENCE.get()
    presence.local.pop((session_id, connection_id), None)
    presence.store.remove(session_id, connection_id)


async def aput(session_id: str, connection_id: str, entry: Entry) -> None:
    """``_put`` from the runtime's loop: with Redis, the entries of a burst of opening
    streams go in one pipeline, without a thread hop."""
    presence = PRESENCE.get()
    if presence.writes is None:
        _put(session_id, connection_id, entry)  # in this process: no I/O
        return
    presence.local[(session_id, connection_id)] = entry
    await presence.writes.submit((session_id, connection_id, entry))


async def aremove(session_id: str, connection_id: str) -> None:
    presence = PRESENCE.get()
    if presence.writes is None:
        _remove(session_id, connection_id)
        return
    presence.local.pop((session_id, connection_id), None)
    await presence.writes.submit((session_id, connection_id, None))


async def refresh_forever() -> None:
    interval = max(1.0, settings.TANDEM_PRESENCE_TTL_SECONDS / 3)
    while True:
        await asyncio.sleep(interval)
        presence = PRESENCE.get()
        items = [(s, c, e) for (s, c), e in list(presence.local.items())]
        try:
            if presence.writes is not None:
                # In the one queue: a refresh must not bring back an entry removed after it.
                await presence.writes.submit_many(items)
            else:
                presence.store.refresh(items)
        except Exception:  # Redis down: entries expire, and come back on the next refresh
            pass
        try:
            await sync_to_async(renew_stream_slots, thread_sensitive=False)()
        except Exception:  # the same: slots lapse and are renewed once Redis is back
            pass
