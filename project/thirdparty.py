"""Every use Tandem makes of a third-party library beyond its public API, in one place.

Each entry below names what is relied on; ``tests/test_thirdparty_contract.py`` checks
each one against the installed release (names, signatures and behaviour), so an
incompatible release fails that test rather than production. ``pyproject.toml`` pins
these packages exactly (``==``); moving a pin means running that test first.

- **channels-redis** (``RedisPubSubChannelLayer``): its wire convention. A group's
  messages are PUBLISHed on the Redis channel ``{prefix}__group__{group}``, on the host
  ``channels_redis.utils._consistent_hash(channel, len(hosts))`` picks, encoded by the
  layer's (public) ``serialize``. ``GroupPublisher`` publishes a batch that way in one
  pipeline per host, on Redis clients of its own (made by the layer's own
  ``decode_hosts``/``create_pool``): the layer's ``group_send`` holds a lock for one
  round trip per message, which made a burst of events wait seconds
  (docs/PERFORMANCE.md).
- **daphne** ``access.AccessLogGenerator.write_entry(self, host, date, request, status,
  length, ident, user)``: replaced so daphne's access log becomes records of the
  ``daphne.access`` logger (redacted, JSON with ``TANDEM_LOG_FORMAT=json``) instead of raw
  lines on stdout.
- **daphne** ``ws_protocol.WebSocketProtocol.handle_reply(self, message)`` with autobahn's
  ``state``/``STATE_OPEN``/``sendClose(code, reason)``: wrapped so a ``websocket.close``
  carries its reason (daphne passes on the code only).
- **drf-spectacular** ``AutoSchema._map_basic_serializer(serializer, direction)``: the
  serializer's schema without the extensions, for an extension that amends it (what
  drf-spectacular's own documentation shows extensions doing).

Only modules in this file import these names; nothing else in the code base reads a
private attribute of a library.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from redis import asyncio as aioredis

# ---------------------------------------------------------------- channels-redis


def group_channel_name(prefix: str, group: str) -> str:
    """The Redis channel a ``RedisPubSubChannelLayer`` with ``prefix`` publishes ``group`` on."""
    return f"{prefix}__group__{group}"


def shard_index(channel: str, shards: int) -> int:
    """Which of the layer's hosts carries ``channel`` (the layer's own hash)."""
    from channels_redis.utils import _consistent_hash

    return int(_consistent_hash(channel, shards))


class GroupPublisher:
    """Publishes group messages for a ``RedisPubSubChannelLayer`` as its ``group_send``
    would, a batch at a time: one pipeline of PUBLISHes per host, in order. Bound to the
    event loop it is first used on (redis-py's clients are); ``aclose`` when done."""

    def __init__(self, layer: Any, config: Mapping[str, Any]) -> None:
        from channels_redis.utils import create_pool, decode_hosts

        self.layer = layer
        self.prefix: str = config.get("prefix", "asgi")
        self._hosts = decode_hosts(config.get("hosts"))
        self._create_pool = create_pool
        self._clients: list[aioredis.Redis | None] = [None] * len(self._hosts)

    def _client(self, index: int) -> aioredis.Redis:
        client = self._clients[index]
        if client is None:
            client = self._clients[index] = aioredis.Redis(connection_pool=self._create_pool(self._hosts[index]))
        return client

    async def publish(self, batch: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        pipes: dict[int, Any] = {}
        for group, message in batch:
            channel = group_channel_name(self.prefix, group)
            index = shard_index(channel, len(self._hosts))
            if index not in pipes:
                pipes[index] = self._client(index).pipeline(transaction=False)
            pipes[index].publish(channel, self.layer.serialize(message))
        for pipe in pipes.values():
            await pipe.execute()

    async def aclose(self) -> None:
        clients, self._clients = self._clients, [None] * len(self._hosts)
        for client in clients:
            if client is not None:
                await client.aclose(close_connection_pool=True)


# ---------------------------------------------------------------- daphne


_daphne_access = logging.getLogger("daphne.access")


def _daphne_entry(
    self: Any, host: str, date: Any, request: str, status: Any = None, length: Any = None,
    ident: Any = None, user: Any = None,
) -> None:
    method, _, path = request.partition(" ")
    _daphne_access.info(
        '%s "%s" %s %s', host, request, status or "-", length or "-",
        extra={"client": host, "method": method, "path": path, "status": status},
    )


def daphne_access_log_to_logging() -> None:
    """Where daphne serves this process, its access entries become records of the
    ``daphne.access`` logger. A no-op under any other server; idempotent."""
    access = sys.modules.get("daphne.access")
    if access is not None and not getattr(access.AccessLogGenerator, "_tandem_adopted", False):
        access.AccessLogGenerator.write_entry = _daphne_entry
        access.AccessLogGenerator._tandem_adopted = True


def daphne_sends_close_reasons() -> None:
    """daphne 4 drops the reason of a ``websocket.close`` (its ``handle_reply`` passes on
    the code only), so under daphne every close frame's reason was empty. Where daphne
    runs this process, pass the reason on too. A no-op under any other server, and if
    daphne's protocol class no longer looks as expected."""
    module = sys.modules.get("daphne.ws_protocol")
    protocol = getattr(module, "WebSocketProtocol", None)
    original = getattr(protocol, "handle_reply", None)
    if protocol is None or original is None or getattr(original, "tandem_reasons", False):
        return

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        code, reason = message.get("code"), message.get("reason")
        if (
            message.get("type") == "websocket.close" and reason and isinstance(code, int)
            and 3000 <= code <= 4999 and self.state == self.STATE_OPEN
        ):
            self.sendClose(code=code, reason=str(reason)[:120])
            return
        original(self, message)

    handle_reply.tandem_reasons = True  # type: ignore[attr-defined]
    protocol.handle_reply = handle_reply


# ---------------------------------------------------------------- drf-spectacular


def basic_serializer_schema(auto_schema: Any, serializer: Any, direction: str) -> Any:
    """The schema drf-spectacular makes of ``serializer`` before extensions apply."""
    return auto_schema._map_basic_serializer(serializer, direction)

