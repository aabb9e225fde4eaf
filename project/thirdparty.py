"""Every use Tandem makes of a third-party library beyond its public API, in one place.

Each entry below names what is relied on; ``tests/test_thirdparty_contract.py`` checks
each one against the installed release (names, signatures and behaviour), so an
incompatible release fails that test rather than production. ``pyproject.toml`` pins
these packages exactly (``==``); moving a pin means running that test first.

- **channels-redis** ``RedisPubSubChannelLayer``: ``publish_group_batch`` sends a batch of
  group messages as the layer's ``group_send`` sends one, in one pipeline per shard: it
  uses ``layer._get_layer()`` (the per-loop ``RedisPubSubLoopLayer``), its
  ``_get_group_channel_name(group)`` and ``_get_shard(channel)``, and the shard's
  ``_ensure_redis()`` and ``_redis`` client (skipping the shard's lock, which only
  serialises publishes). The layer's ``group_send`` publishes one message per round trip
  under that lock, which made a burst of events wait seconds (docs/PERFORMANCE.md).
  Publishing on a Redis client of Tandem's own, with the same channel names and
  encoding, was tried: an abort sent right after a post then sometimes missed the run on
  the other process (tests/test_cross_process.py), so the layer's own client stays.
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

# ---------------------------------------------------------------- channels-redis


async def publish_group_batch(layer: Any, batch: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """What ``RedisPubSubChannelLayer.group_send`` does for one message, for a whole batch:
    the same Redis channels, shards and encoding, on the layer's own per-shard clients, in
    one pipeline of PUBLISHes per shard, in order. (The layer's own ``group_send`` holds a
    lock for one round trip per message.)"""
    loop_layer = layer._get_layer()
    pipes: dict[int, Any] = {}
    for group, message in batch:
        channel = loop_layer._get_group_channel_name(group)
        shard = loop_layer._get_shard(channel)
        if id(shard) not in pipes:
            shard._ensure_redis()
            pipes[id(shard)] = shard._redis.pipeline(transaction=False)
        pipes[id(shard)].publish(channel, layer.serialize(message))
    for pipe in pipes.values():
        await pipe.execute()


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

