"""The Redis pub/sub bridge for external agent services (``manage.py ingest_redis``).

An agent service publishes ``{"type": "task.progress", "properties": {...}}`` to the Redis
channel ``<prefix><session id>`` (``tandem:ingest:ses_…`` with the default pattern
``tandem:ingest:*``). The bridge, subscribed to the pattern, publishes each message into
that session on behalf of its service user, with exactly the checks of the REST publish
endpoint (``events_app.publishing.publish_json``), so the service user must be an editor
or owner of the session.

A message that fails any check is logged at WARNING (reason and channel, a truncated
preview of the payload) and counted as ``rejected``; it never stops the bridge. When the
Redis connection is lost the bridge logs it, waits (0.5 s doubling to 5 s) and subscribes
again, until ``stop`` is set. Messages from one channel are published in arrival order.

Redis pub/sub delivers at most once: what is published while no bridge is subscribed is
lost. A publisher that needs every event to arrive should use the REST API, or a durable
log (a Kafka topic or a Redis stream) bridged the same way with offsets committed after
each publish.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events_app.publishing import publish_json
from project import redisconn
from project.db import off_loop
from project.errors import ApiError

log = logging.getLogger(__name__)

PREVIEW_CHARS = 120
GLOB_CHARS = "*?[]\\"


def pattern_prefix(pattern: str) -> str:
    """The fixed prefix of a ``prefix*`` pattern; ValueError for any other shape."""
    prefix = pattern[:-1]
    if not pattern.endswith("*") or not prefix or any(c in prefix for c in GLOB_CHARS):
        raise ValueError(
            f"The ingest pattern must be a fixed prefix followed by '*' (like 'tandem:ingest:*'), not {pattern!r}."
        )
    return prefix


def preview(data: bytes) -> str:
    """The payload's start, on one log line, for a log that must not hold all of it."""
    text = _one_line(data[:PREVIEW_CHARS].decode("utf-8", "replace"))
    if len(data) > PREVIEW_CHARS:
        text += f"… ({len(data)} bytes)"
    return text


@dataclass
class IngestStats:
    received: int = 0
    published: int = 0
    rejected: int = 0
    failed: int = 0  # unexpected errors (the database unreachable, a bug): logged with traceback
    connections: int = 0  # successful subscriptions, the first one included
    reasons: Counter[str] = field(default_factory=Counter)  # rejections by error code

    @property
    def handled(self) -> int:
        """Messages done with; ``received`` also counts the one being handled."""
        return self.published + self.rejected + self.failed

    def summary(self) -> str:
        text = (
            f"received={self.received} published={self.published} rejected={self.rejected} "
            f"failed={self.failed} reconnects={max(self.connections - 1, 0)}"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{code}: {n}" for code, n in sorted(self.reasons.items())) + ")"
        return text


class RedisIngest:
    """``await RedisIngest(url, pattern, user).run()`` until ``.stop`` is set."""

    def __init__(
        self,
        redis_url: str,
        pattern: str,
        user: str,
        *,
        stop: asyncio.Event | None = None,
        client_name: str = "tandem-ingest",
        backoff_initial: float = 0.5,
        backoff_max: float = 5.0,
        poll_seconds: float = 0.25,
    ) -> None:
        self.redis_url = redis_url
        self.pattern = pattern
        self.prefix = pattern_prefix(pattern)
        self.user = user
        self.stop = stop if stop is not None else asyncio.Event()
        self.client_name = client_name
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_seconds = poll_seconds
        self.stats = IngestStats()
        self.subscribed = asyncio.Event()  # set while the pattern subscription is confirmed
        self._publish = off_loop(publish_json)

    async def run(self) -> IngestStats:
        delay = self.backoff_initial
        while not self.stop.is_set():
            connections = self.stats.connections
            try:
                await self._subscribe_and_serve()
                break  # stopped
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stats.connections > connections:
                    delay = self.backoff_initial  # it had worked: the back-off starts over
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                    log.warning("Redis connection for %s lost or refused (%s); retrying in %.2f s",
                                self.pattern, exc, delay)
                else:  # a bug or an unexpected reply: keep the bridge alive all the same
                    log.exception("Redis ingest failed; retrying in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()
            delay = min(delay * 2, self.backoff_max)
        return self.stats

    async def _subscribe_and_serve(self) -> None:
        client = redisconn.async_client(
            self.redis_url,
            client_name=self.client_name,
            socket_connect_timeout=5,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),  # reconnection (with back-off) is ours, below
        )
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(self.pattern)
            while not self.stop.is_set():
                message = await pubsub.get_message(timeout=self.poll_seconds)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "psubscribe":
                    self.stats.connections += 1
                    self.subscribed.set()
                    if self.stats.connections == 1:
                        log.info("Ingesting events from Redis pattern %s as %s", self.pattern, self.user)
                    else:
                        log.info("Subscribed to %s again", self.pattern)
                elif kind == "pmessage":
                    await self.handle(_text(message["channel"]), message["data"])
        finally:
            self.subscribed.clear()
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:  # the connection is already gone
                pass

    async def handle(self, channel: str, data: Any) -> dict[str, Any] | None:
        """Publish one message; the envelope, or None when it was rejected."""
        self.stats.received += 1
        raw = data if isinstance(data, bytes) else str(data).encode("utf-8", "surrogatepass")
        session_id = channel[len(self.prefix):] if channel.startswith(self.prefix) else ""
        try:
            envelope: dict[str, Any] = await self._publish(session_id, raw, as_user=self.user, require_properties=True)
        except ApiError as err:
            self.stats.rejected += 1
            self.stats.reasons[err.code] += 1
            detail = f" {_short(err.details)}" if err.details else ""
            log.warning("Rejected a message on %s: %s: %s%s | %s",
                        _short(channel), err.code, err.message, detail, preview(raw))
            return None
        except Exception:
            self.stats.failed += 1
            log.exception("Could not publish a message on %s | %s", _short(channel), preview(raw))
            return None
        self.stats.published += 1
        return envelope


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short(value: Any, limit: int = 200) -> str:
    text = _one_line(value if isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[:limit] + "…"


def _one_line(text: str) -> str:
    # A channel name or payload from outside must not forge log lines.
    return text if text.isprintable() else repr(text)[1:-1]
