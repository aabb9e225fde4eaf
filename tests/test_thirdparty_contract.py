"""What ``project/thirdparty.py`` relies on in third-party libraries beyond their public API,
checked against the installed releases: a release that renames, re-signs or changes any of
it fails here (and the exact pins in pyproject.toml say which releases were checked)."""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import pytest
from channels.layers import get_channel_layer

from project import thirdparty


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# ---------------------------------------------------------------- channels-redis


def test_channels_redis_pubsub_layer_keeps_the_internals_the_batch_publisher_uses() -> None:
    from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
    from redis.asyncio import Redis

    assert _params(RedisPubSubChannelLayer._get_layer) == ["self"]
    assert _params(RedisPubSubChannelLayer.serialize) == ["self", "message"]
    assert _params(RedisPubSubLoopLayer._get_group_channel_name) == ["self", "group"]
    assert _params(RedisPubSubLoopLayer._get_shard) == ["self", "channel_or_group_name"]
    assert _params(RedisSingleShardConnection._ensure_redis) == ["self"]

    loop_layer = RedisPubSubLoopLayer(hosts=["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"], prefix="pfx")
    channel = loop_layer._get_group_channel_name("tandem.s.abc")
    # The group's Redis channel carries the prefix and the group (other processes subscribe to it).
    assert channel.startswith("pfx") and channel.endswith("tandem.s.abc")
    shard = loop_layer._get_shard(channel)
    assert shard in loop_layer._shards and shard is loop_layer._get_shard(channel)
    shard._ensure_redis()  # makes the client; connects only on first use
    assert isinstance(shard._redis, Redis)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_batch_published_through_the_adapter_reaches_group_members_in_order(redis_layer: str) -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel("contract.")
    await layer.group_add("tandem.contract", channel)
    try:
        sent = [{"type": "contract", "n": n, "text": "é" * n} for n in range(20)]
        await thirdparty.publish_group_batch(layer, [("tandem.contract", m) for m in sent])
        received = [await asyncio.wait_for(layer.receive(channel), 5) for _ in sent]
        assert received == sent
    finally:
        await layer.group_discard("tandem.contract", channel)
        await layer.flush()


@pytest.mark.redis
async def test_a_batch_spread_over_two_shards_reaches_each_groups_members_in_order() -> None:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from tests.conftest import REDIS_URL, _require_redis

    _require_redis()
    # Two "hosts" on one server (pub/sub ignores the database number): groups hash to both.
    base = REDIS_URL.rsplit("/", 1)[0]
    layer = RedisPubSubChannelLayer(hosts=[f"{base}/0", f"{base}/1"], prefix=f"contract{id(object())}")
    loop_layer = layer._get_layer()
    by_shard: dict[int, list[str]] = {}
    for i in range(200):
        group = f"tandem.contract.{i}-{i * 7919}"
        by_shard.setdefault(id(loop_layer._get_shard(loop_layer._get_group_channel_name(group))), []).append(group)
    assert len(by_shard) == 2
    group_names = [g for groups in by_shard.values() for g in groups[:3]]
    channels = {}
    for group in group_names:
        channels[group] = await layer.new_channel("contract.")
        await layer.group_add(group, channels[group])
    try:
        batch = [(group, {"type": "contract", "group": group, "n": n}) for n in range(5) for group in group_names]
        await thirdparty.publish_group_batch(layer, batch)
        for group in group_names:
            got = [await asyncio.wait_for(layer.receive(channels[group]), 5) for _ in range(5)]
            assert got == [m for g, m in batch if g == group]
    finally:
        await layer.flush()


# ---------------------------------------------------------------- daphne


def test_daphne_access_log_entry_point_keeps_its_signature_and_is_replaced() -> None:
    from daphne import access

    assert _params(access.AccessLogGenerator.write_entry) == [
        "self", "host", "date", "request", "status", "length", "ident", "user",
    ]
    thirdparty.daphne_access_log_to_logging()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("daphne.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        # How daphne's server calls it (daphne.http_protocol / ws_protocol).
        access.AccessLogGenerator(None).write_entry(
            host="10.0.0.1", date=None, request="GET /api/x", status=200, length=5,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [(r.client, r.method, r.path, r.status) for r in records] == [  # type: ignore[attr-defined]
        ("10.0.0.1", "GET", "/api/x", 200)
    ]


def test_daphne_websocket_close_keeps_the_shape_the_reason_wrapper_relies_on() -> None:
    from daphne import ws_protocol

    protocol = ws_protocol.WebSocketProtocol
    assert _params(protocol.handle_reply) == ["self", "message"]
    # Before the wrapper: daphne's own handle_reply closes with the code only.
    assert "serverClose(code=message.get(\"code\", None))" in inspect.getsource(protocol.handle_reply) or getattr(
        protocol.handle_reply, "tandem_reasons", False
    )
    assert hasattr(protocol, "STATE_OPEN")
    assert {"code", "reason"} <= set(_params(protocol.sendClose))

    thirdparty.daphne_sends_close_reasons()
    sent: list[tuple[Any, Any]] = []
    fake = type("Fake", (), {
        "STATE_OPEN": protocol.STATE_OPEN, "state": protocol.STATE_OPEN,
        "sendClose": lambda self, code=None, reason=None: sent.append((code, reason)),
    })()
    protocol.handle_reply(fake, {"type": "websocket.close", "code": 4403, "reason": "member_removed"})
    assert sent == [(4403, "member_removed")]


# ---------------------------------------------------------------- drf-spectacular


def test_drf_spectacular_maps_a_basic_serializer_without_extensions() -> None:
    from drf_spectacular.openapi import AutoSchema
    from drf_spectacular.plumbing import ComponentRegistry
    from rest_framework import serializers
    from rest_framework.generics import GenericAPIView

    assert _params(AutoSchema._map_basic_serializer) == ["self", "serializer", "direction"]

    class Probe(serializers.Serializer):
        name = serializers.CharField(max_length=5)

    class ProbeView(GenericAPIView):
        serializer_class = Probe

    # As drf-spectacular's generator sets up the AutoSchema of one endpoint.
    auto_schema = AutoSchema()
    view = ProbeView()
    view.request, view.format_kwarg = None, None
    auto_schema.view = view
    auto_schema.method, auto_schema.path, auto_schema.registry = "POST", "/probe/", ComponentRegistry()
    schema = thirdparty.basic_serializer_schema(auto_schema, Probe(), "request")
    assert schema["type"] == "object"
    assert schema["properties"]["name"]["maxLength"] == 5
    assert schema["required"] == ["name"]
