"""Redis through Sentinel: a ``redis+sentinel://`` REDIS_URL makes every Redis client
(channel layer, presence, limits, readiness) find the primary through the sentinels."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from project.redisconn import channel_layer_host, parse_sentinel
from tests.conftest import free_port, token_for


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "redis+sentinel://s1:26379,s2:26380/mymaster",
            {"master_name": "mymaster", "sentinels": [("s1", 26379), ("s2", 26380)], "db": 0},
        ),
        (
            "redis+sentinel://:p%40ss@s1:26379/mymaster/3",
            {"master_name": "mymaster", "sentinels": [("s1", 26379)], "db": 3, "password": "p@ss"},
        ),
    ],
)
def test_redis_urls_become_channel_layer_hosts(url: str, expected: Any) -> None:
    assert channel_layer_host(url) == expected


@pytest.mark.parametrize(
    "url", ["redis+sentinel://s1/mymaster", "redis+sentinel://s1:26379", "redis+sentinel://s1:26379/m/x", "redis+sentinel://s1:26379/a/1/2"]
)
def test_malformed_sentinel_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_sentinel(url)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """A real Sentinel watching the test Redis as ``tandemtest``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is required to run a Sentinel")
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        "sentinel monitor tandemtest 127.0.0.1 6379 1\n"
    )
    proc = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=port, socket_connect_timeout=0.5).ping():
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "sentinel did not start"
                time.sleep(0.05)
        yield f"redis+sentinel://127.0.0.1:{port}/tandemtest/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.redis
def test_processes_configured_with_sentinel_share_events_and_are_ready(
    servers: Any, sentinel: str, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, REDIS_URL=sentinel)
    ready = httpx.get(f"{server_a.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["channel_layer"] == "ok"
    stream = sse_streams(server_a.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with httpx.Client(base_url=server_b.url, headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=10) as client:
        seq = client.post(f"/api/sessions/{shared_session.id}/events/", json={"type": "task.progress", "properties": {}}).json()["seq"]
        stream.wait_for_seq(seq, timeout=5)
        presence = client.get(f"/api/sessions/{shared_session.id}/presence/").json()
    assert [row["user"]["username"] for row in presence] == ["alice"]  # seen across processes
