"""Connections to Redis from one URL, plain or through Sentinel.

``REDIS_URL`` is either ``redis://[:password@]host:port/db`` or
``redis+sentinel://[:password@]sentinel1:26379,sentinel2:26379/master-name[/db]``; with
the second, every client (the channel layer, presence, limits, the ingest bridge) asks
the sentinels for the current primary and follows a failover.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    password: str | None


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel parts of ``url``; None for a plain ``redis://`` URL. ValueError when
    a Sentinel URL is malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {item!r} must be host:port")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends with /master-name or /master-name/db")
    password = unquote(parts.password) if parts.password else None
    return SentinelTarget(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password)


def client(url: str, **options: Any) -> redis.Redis:
    target = parse_sentinel(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    sentinel = Sentinel(target.sentinels, socket_timeout=options.get("socket_timeout", 2))
    master: redis.Redis = sentinel.master_for(target.master, db=target.db, password=target.password, **options)
    return master


def async_client(url: str, **options: Any) -> aioredis.Redis:
    target = parse_sentinel(url)
    if target is None:
        return aioredis.Redis.from_url(url, **options)
    sentinel = AsyncSentinel(target.sentinels, socket_timeout=options.get("socket_connect_timeout", 2))
    async_master: aioredis.Redis = sentinel.master_for(
        target.master, db=target.db, password=target.password, **options
    )
    return async_master


def channel_layer_host(url: str) -> str | dict[str, Any]:
    """The channels-redis ``hosts`` entry for ``url``."""
    target = parse_sentinel(url)
    if target is None:
        return url
    host: dict[str, Any] = {"master_name": target.master, "sentinels": target.sentinels, "db": target.db}
    if target.password:
        host["password"] = target.password
    return host
