"""An event stream (SSE or WebSocket, one session or the user level) that loses Redis
while it joins its groups on the hub — after its slot was taken, before it starts — is
refused like a stream opened while Redis is down (tests/test_redis_outage.py): SSE
``503 unavailable`` with ``Retry-After``, WebSocket close ``4503``. Nothing is left
held, and a retry once Redis is back resumes with nothing lost.

The stream slots and presence live on the real Redis; only the channel layer goes
through a TCP proxy the test controls, so the outage lands exactly in the join."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from channels.layers import channel_layers

from events_app import fanout, groups, presence
from project import limits, runtime
from tests import runtime_control
from tests.conftest import REDIS_URL, _require_redis, token_for
from tests.runtime_control import fresh_runtimes
from tests.streamutil import (
    SSEClient,
    WSClient,
    bind_runtime,
    create_shared_session,
    eventually,
    publish_many,
    stream_groups,
    stream_path,
)

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


class LayerProxy:
    """A TCP proxy in front of Redis for the channel layer. ``refuse()``: every connection
    through it is cut and new ones are closed at once (Redis stopped). ``hang()``: cut,
    and new ones are accepted and never answered (Redis hung). ``restore()``: Redis back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "pass"
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                mode = self.mode
                if mode == "refuse":
                    client.close()
                    continue
                self.open.append(client)
            if mode == "hang":
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        with self.lock:
            held, self.open = self.open, []
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def refuse(self) -> None:
        self.mode = "refuse"
        self._cut()

    def hang(self) -> None:
        self.mode = "hang"
        self._cut()

    def restore(self) -> None:
        self.mode = "pass"
        self._cut()  # the connections held by a hang

    def close(self) -> None:
        self.server.close()
        self._cut()


@pytest.fixture
def layer_proxy(settings: Any) -> Iterator[LayerProxy]:
    _require_redis()
    parts = urlsplit(REDIS_URL)
    proxy = LayerProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    settings.REDIS_URL = REDIS_URL  # slots and presence: the real Redis, always up
    settings.TANDEM_CHANNEL_PREFIX = f"tandemjoin{os.getpid()}x{time.monotonic_ns()}"
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [proxy.url], "prefix": settings.TANDEM_CHANNEL_PREFIX},
        }
    }
    channel_layers.backends.clear()
    fresh_runtimes()
    yield proxy
    proxy.restore()
    channel_layers.backends.clear()
    fresh_runtimes()
    proxy.close()


@pytest.fixture
async def session(layer_proxy: LayerProxy, alice: Any, bob: Any, carol: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)
    # Stop this runtime's tasks here, on the test's loop, while Redis still answers through
    # the proxy. Left to the loop's own teardown (one cancel each), a cancel swallowed
    # inside a redis-py call left a task retrying against the proxy once it was closed,
    # and the teardown waited for it until pytest-timeout (CI, PostgreSQL run).
    layer_proxy.restore()
    await runtime_control.close(runtime.current())


def slots_on_redis(user_id: int) -> int:
    key = f"{limits._prefix()}:streams:{user_id}"
    return int(redis.Redis.from_url(REDIS_URL).zcard(key))


def ws_path(session_id: str | None) -> str:
    return f"/ws/sessions/{session_id}/" if session_id else "/ws/stream/"


async def position(transport: str, session_id: str | None, user: Any) -> str:
    """Open a stream while Redis is up; the position it starts at (a session's last seq,
    the user-level stream's cursor), to resume from later."""
    params = {"token": token_for(user)}
    if transport == "sse":
        sse = SSEClient(stream_path(session_id), params=params)
        connected = (await sse.connected()).data
        await sse.close()
    else:
        ws = WSClient(ws_path(session_id), params=params)
        assert (await ws.connect())[0]
        connected = await ws.receive()
        await ws.disconnect()
    assert connected is not None and connected["type"] == "server.connected"
    props = connected["properties"]
    return str(props["last_seq"] if session_id else props["cursor"])


async def refused(transport: str, session_id: str | None, user: Any, after: str) -> None:
    """Opening from ``after`` is refused as unavailable: 503 + Retry-After, or 4503."""
    params = {"token": token_for(user), "last_event_id": after}
    if transport == "sse":
        sse = SSEClient(stream_path(session_id), params=params)
        assert await sse.open() == 503
        body = await sse.json()
        assert body["error"]["code"] == "unavailable", body
        assert set(body["error"]) == {"code", "message", "details"}
        assert sse.headers["content-type"] == "application/json"
        assert sse.headers["retry-after"] == str(limits.STREAM_RETRY_AFTER)
    else:
        ws = WSClient(ws_path(session_id), params=params)
        accepted, _ = await ws.connect()
        assert accepted  # refusals accept, then close (a browser cannot read a failed handshake)
        assert await ws.closed() == 4503
        await ws.comm.wait(timeout=5)


async def resumed(transport: str, session_id: str | None, user: Any, after: str, seqs: list[int]) -> bool:
    """A stream opened from ``after`` replays exactly ``seqs`` of the session, in order;
    False (try again) while it is still refused."""
    params = {"token": token_for(user), "last_event_id": after}
    events: list[dict[str, Any]] = []
    if transport == "sse":
        sse = SSEClient(stream_path(session_id), params=params)
        if await sse.open() != 200:
            await sse.json()
            return False
        await sse.until(lambda f: f.type == "task.progress" and f.seq == seqs[-1])
        events = [f.data for f in sse.frames if f.data is not None]
        await sse.close()
    else:
        ws = WSClient(ws_path(session_id), params=params)
        assert (await ws.connect())[0]
        first = await ws.raw()
        if first["type"] == "websocket.close":
            await ws.comm.wait(timeout=5)
            return False
        ws.received.append(json.loads(first["text"]))
        await ws.until(lambda d: d.get("type") == "task.progress" and d.get("seq") == seqs[-1])
        events = ws.received
        await ws.disconnect()
    connected = events[0]
    assert connected["type"] == "server.connected" and connected["properties"]["resumed"] is True, connected
    assert [e["seq"] for e in events if e["type"] == "task.progress"] == seqs
    return True


async def cold_process() -> None:
    """This process starts afresh: its channel layer holds no connection to Redis, so the
    next stream's join opens one (as after Redis went away under an idle layer)."""
    await runtime_control.close(runtime.current())
    channel_layers.backends.clear()
    bind_runtime()


async def nothing_held(session_id: str, user: Any) -> None:
    hub = fanout.get_hub()
    await eventually(lambda: not stream_groups(hub))
    assert groups.session_group(session_id) not in hub.groups
    assert groups.user_group(user.pk) not in hub.groups
    assert not limits.STATE.get().held
    assert slots_on_redis(user.pk) == 0
    assert presence.summary(session_id) == []


@pytest.mark.parametrize("outage", ["stopped", "hung"])
@pytest.mark.parametrize("level", ["session", "user"])
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_stream_losing_redis_while_joining_is_refused_as_unavailable_and_resumes_after(
    session: Any, layer_proxy: LayerProxy, bob: Any, transport: str, level: str, outage: str
) -> None:
    sid = session.id if level == "session" else None
    after = await position(transport, sid, bob)
    await cold_process()
    layer_proxy.refuse() if outage == "stopped" else layer_proxy.hang()
    # Accepted meanwhile: they are in the log, to be replayed once Redis is back.
    seqs = await publish_many(session.id, 3)
    await refused(transport, sid, bob, after)
    await nothing_held(session.id, bob)
    layer_proxy.restore()
    await eventually(lambda: resumed(transport, sid, bob, after, seqs), timeout=15, interval=0.2)
