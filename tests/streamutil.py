"""Stream clients for tests, driven through real Channels communicators against
``project.asgi.application``.

``HttpCommunicator`` waits for the whole body, so SSE is read here with an
``ApplicationCommunicator`` and a small SSE parser. Reads never use the communicator's
own ``receive_output(timeout)``: on timeout it cancels the application, which would turn
"nothing arrived yet" into "the server closed the stream".
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator, WebsocketCommunicator

from project import runtime

WAIT = 5.0  # the bound on every wait: a test fails when it passes, it never sleeps it out


def app() -> Any:
    from project.asgi import application

    return application


def bind_runtime() -> None:
    """Make this test's loop the process's main loop *before* any service publishes, so
    fan-out runs on the loop the hub reads on (the ASGI app also binds it on each call)."""
    runtime.bind(asyncio.get_running_loop())


# ---------------------------------------------------------------- SSE


@dataclass
class SSEFrame:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    retry: int | None
    raw: str

    @property
    def type(self) -> str | None:
        return None if self.data is None else self.data.get("type")

    @property
    def seq(self) -> int | None:
        return None if self.data is None else self.data.get("seq")


def parse_sse_block(block: str) -> SSEFrame:
    """One SSE event block (the text between blank lines), parsed as a browser would."""
    fields: dict[str, list[str]] = {}
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        fields.setdefault(name, []).append(value)
    data_lines = fields.get("data")
    data = json.loads("\n".join(data_lines)) if data_lines else None
    retry = fields.get("retry")
    return SSEFrame(
        id=fields["id"][-1] if "id" in fields else None,
        event=fields["event"][-1] if "event" in fields else None,
        data=data,
        retry=int(retry[-1]) if retry else None,
        raw=block,
    )


class SSEClient:
    """``GET`` a stream endpoint and read its frames as they arrive.

    ``buffer`` bounds the server-to-client queue: with a small one and no reading, the
    server's writes block, as they do on a socket whose reader has stalled.
    """

    def __init__(
        self,
        path: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        buffer: int = 0,
    ) -> None:
        query = urlencode(params or {})
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.comm = ApplicationCommunicator(app(), scope)
        self.comm._output_queue = asyncio.Queue(maxsize=buffer)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.buffer = ""
        self.body = b""
        self.ended = False
        self.frames: list[SSEFrame] = []  # every frame read so far

    async def _message(self, timeout: float) -> dict[str, Any]:
        if self.comm.future.done() and self.comm.output_queue.empty():
            self.comm.future.result()
            raise AssertionError("the application ended without finishing its response")
        return await asyncio.wait_for(self.comm.output_queue.get(), timeout)

    async def open(self, timeout: float = WAIT) -> int:
        await self.comm.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await self._message(timeout)
        assert start["type"] == "http.response.start", start
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        return self.status

    async def _read_body(self, timeout: float) -> bool:
        """Read one body message; False once the body has ended."""
        if self.ended:
            return False
        message = await self._message(timeout)
        assert message["type"] == "http.response.body", message
        chunk = message.get("body", b"")
        self.body += chunk
        self.buffer += chunk.decode()
        if not message.get("more_body", False):
            self.ended = True
        return True

    async def json(self, timeout: float = WAIT) -> Any:
        """The whole body of a non-stream (error) response, decoded."""
        while await self._read_body(timeout):
            pass
        return json.loads(self.body)

    async def next_frame(self, timeout: float = WAIT) -> SSEFrame:
        """The next frame (the preamble ``retry:`` included). Fails on timeout or on the
        end of the body."""
        async with asyncio.timeout(timeout):
            while "\n\n" not in self.buffer:
                if not await self._read_body(timeout):
                    raise AssertionError(f"the stream ended; frames so far: {self.types()}")
            block, self.buffer = self.buffer.split("\n\n", 1)
        frame = parse_sse_block(block)
        self.frames.append(frame)
        return frame

    async def next_event(self, timeout: float = WAIT) -> SSEFrame:
        """The next frame that carries data."""
        while True:
            frame = await self.next_frame(timeout)
            if frame.data is not None:
                return frame

    async def until(
        self, predicate: Callable[[SSEFrame], bool], timeout: float = WAIT
    ) -> list[SSEFrame]:
        """Events up to and including the first that satisfies ``predicate``."""
        seen: list[SSEFrame] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_event(timeout)
                seen.append(frame)
                if predicate(frame):
                    return seen

    async def until_type(self, type_name: str, timeout: float = WAIT) -> list[SSEFrame]:
        return await self.until(lambda f: f.type == type_name, timeout)

    async def until_seq(self, seq: int, timeout: float = WAIT) -> list[SSEFrame]:
        return await self.until(lambda f: f.seq is not None and f.seq >= seq, timeout)

    async def ends(self, timeout: float = WAIT, *, dropped_ok: bool = False) -> list[SSEFrame]:
        """Read to the end of the body (which must come within ``timeout``); returns the
        events read meanwhile. With ``dropped_ok`` the application may also stop without
        finishing the body: on a real socket that is the connection being dropped, which
        is how a server must end a client that stopped reading."""
        seen: list[SSEFrame] = []
        async with asyncio.timeout(timeout):
            while True:
                while "\n\n" in self.buffer:
                    block, self.buffer = self.buffer.split("\n\n", 1)
                    frame = parse_sse_block(block)
                    self.frames.append(frame)
                    if frame.data is not None:
                        seen.append(frame)
                if dropped_ok and self.comm.future.done() and self.comm.output_queue.empty():
                    self.comm.future.result()
                    self.ended = True
                    return seen
                if not await self._read_body(timeout):
                    return seen

    async def connected(self, timeout: float = WAIT) -> SSEFrame:
        """Open and read ``server.connected`` (whose block also carries ``retry: 3000``)."""
        status = await self.open(timeout)
        assert status == 200, (status, await self.json())
        hello = await self.next_frame(timeout)
        assert hello.type == "server.connected" and hello.retry == 3000, hello.raw
        return hello

    def types(self) -> list[str | None]:
        return [f.type for f in self.frames if f.data is not None]

    async def close(self, timeout: float = WAIT) -> None:
        """The client goes away; the application must finish within ``timeout``."""
        if not self.comm.future.done():
            await self.comm.input_queue.put({"type": "http.disconnect"})
        # Drain what is left so a bounded buffer cannot keep the writer blocked.
        async with asyncio.timeout(timeout):
            while not self.comm.future.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.comm.output_queue.get(), 0.05)
        self.comm.future.result()


def stream_path(session_id: str | None) -> str:
    return f"/api/sessions/{session_id}/stream/" if session_id else "/api/stream/"


# ---------------------------------------------------------------- WebSocket


class WSClient:
    """A WebsocketCommunicator whose reads never cancel the application on timeout."""

    def __init__(
        self, path: str, *, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        query = urlencode(params or {})
        self.comm = WebsocketCommunicator(
            app(),
            f"{path}?{query}" if query else path,
            headers=[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        )
        self.received: list[dict[str, Any]] = []

    async def connect(self, timeout: float = WAIT) -> tuple[bool, Any]:
        await self.comm.send_input({"type": "websocket.connect"})
        first = await self.raw(timeout)
        if first["type"] == "websocket.close":
            return False, first.get("code", 1000)
        assert first["type"] == "websocket.accept", first
        return True, None

    async def raw(self, timeout: float = WAIT) -> dict[str, Any]:
        if self.comm.future.done() and self.comm.output_queue.empty():
            self.comm.future.result()
            raise AssertionError("the application ended")
        return await asyncio.wait_for(self.comm.output_queue.get(), timeout)

    async def receive(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next JSON frame; fails if the server closes instead."""
        message = await self.raw(timeout)
        assert message["type"] == "websocket.send", message
        assert "text" in message and message["text"] is not None, message
        data: dict[str, Any] = json.loads(message["text"])
        self.received.append(data)
        return data

    async def seen(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        """The first frame received so far, or from now on, that satisfies ``predicate``
        (a command's reply and the events it causes may arrive in either order)."""
        for data in self.received:
            if predicate(data):
                return data
        return (await self.until(predicate, timeout))[-1]

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                data = await self.receive(timeout)
                seen.append(data)
                if predicate(data):
                    return seen

    async def until_type(self, type_name: str, timeout: float = WAIT) -> list[dict[str, Any]]:
        return await self.until(lambda d: d.get("type") == type_name, timeout)

    async def reply(self, command_id: Any, timeout: float = WAIT) -> dict[str, Any]:
        """The reply to command ``command_id``, skipping stream events."""
        frames = await self.until(
            lambda d: d.get("type") in ("pong", "ack", "error") and d.get("id") == command_id, timeout
        )
        return frames[-1]

    async def send(self, data: Any) -> None:
        await self.comm.send_input({"type": "websocket.receive", "text": json.dumps(data)})

    async def send_text(self, text: str) -> None:
        await self.comm.send_input({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.comm.send_input({"type": "websocket.receive", "bytes": data})

    async def closed(self, timeout: float = WAIT) -> int:
        """Skip frames until the server closes; returns the close code."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.raw(timeout)
                if message["type"] == "websocket.close":
                    return int(message.get("code", 1000))
                if message.get("text"):
                    self.received.append(json.loads(message["text"]))

    async def disconnect(self, code: int = 1000, timeout: float = WAIT) -> None:
        if not self.comm.future.done():
            await self.comm.input_queue.put({"type": "websocket.disconnect", "code": code})
        async with asyncio.timeout(timeout):
            while not self.comm.future.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.comm.output_queue.get(), 0.05)
        self.comm.future.result()


# ---------------------------------------------------------------- data


@database_sync_to_async
def create_shared_session(alice: Any) -> Any:
    """alice's session with bob (editor) and carol (viewer); made inside the test's loop
    so its events fan out on the loop that reads them."""
    from sessions_app import services

    session = services.create_session(alice, title="Fix the login bug", agent="echo")
    services.add_member(session, username="bob", role="editor")
    services.add_member(session, username="carol", role="viewer")
    session.refresh_from_db()
    return session


@database_sync_to_async
def publish_many(session_id: str, n: int, type_name: str = "task.progress") -> list[int]:
    """``n`` persisted events; returns their seqs."""
    from events_app.services import publish

    return [publish(session_id, type_name, {"i": i}).seq for i in range(n)]  # type: ignore[misc]


@database_sync_to_async
def head(session_id: str) -> int:
    from sessions_app.models import Session

    return int(Session.objects.values_list("last_seq", flat=True).get(pk=session_id))


async def eventually(predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.02) -> Any:
    """Async ``wait_until``: a bounded wait that fails on timeout."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(interval)


def stream_groups(hub: Any) -> dict[str, set[Any]]:
    """The hub's groups with a listener that is not an agents pool (a pool listens on a
    group of its own for as long as it runs replies, whatever the streams do)."""
    from sessions_app.agents.pool import Pool

    return {g: m for g, m in hub.groups.items() if any(not isinstance(x, Pool) for x in m)}
