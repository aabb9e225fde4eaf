"""A y-websocket peer for tests: a ``pycrdt`` document on the other end of the shared
document's WebSocket, speaking the wire protocol byte for byte (sync steps, updates,
awareness). ``InProcessTransport`` drives ``project.asgi.application`` through a Channels
communicator; ``SocketTransport`` a real server over a real socket (``websockets``)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol
from urllib.parse import urlencode

from pycrdt import Doc, Text

from tests.streamutil import WAIT, WSClient

SYNC, AWARENESS = 0, 1
STEP1, STEP2, UPDATE = 0, 1, 2


def var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


def read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def read_var_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = read_var_uint(data, pos)
    return data[pos : pos + length], pos + length


def sync_frame(kind: int, payload: bytes) -> bytes:
    return bytes((SYNC, kind)) + var_bytes(payload)


def awareness_update(client: int, clock: int, state: str) -> bytes:
    return var_uint(1) + var_uint(client) + var_uint(clock) + var_bytes(state.encode())


def awareness_frame(update: bytes) -> bytes:
    return bytes((AWARENESS,)) + var_bytes(update)


def parse_awareness(update: bytes) -> list[tuple[int, int, str]]:
    count, pos = read_var_uint(update, 0)
    out = []
    for _ in range(count):
        client, pos = read_var_uint(update, pos)
        clock, pos = read_var_uint(update, pos)
        state, pos = read_var_bytes(update, pos)
        out.append((client, clock, state.decode()))
    return out


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class Transport(Protocol):
    async def open(self) -> int | None: ...  # None when accepted, else the close code
    async def send(self, data: bytes | str) -> None: ...
    async def recv(self, timeout: float) -> bytes: ...  # raises Closed
    async def close(self) -> None: ...


class InProcessTransport:
    def __init__(self, session_id: str, params: dict[str, str], headers: dict[str, str] | None = None) -> None:
        self.client = WSClient(f"/ws/sessions/{session_id}/doc/", params=params, headers=headers)

    async def open(self) -> int | None:
        accepted, code = await self.client.connect()
        if accepted:
            return None
        return int(code)

    async def send(self, data: bytes | str) -> None:
        # send_input: the communicator's send_to refuses an empty frame.
        key = "text" if isinstance(data, str) else "bytes"
        await self.client.comm.send_input({"type": "websocket.receive", key: data})

    async def recv(self, timeout: float) -> bytes:
        message = await self.client.raw(timeout)
        if message["type"] == "websocket.close":
            raise Closed(message.get("code"))
        assert message["type"] == "websocket.send" and message.get("bytes") is not None, message
        return bytes(message["bytes"])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.comm.disconnect()


class SocketTransport:
    def __init__(self, base_url: str, session_id: str, params: dict[str, str]) -> None:
        self.url = f"{base_url}/ws/sessions/{session_id}/doc/?{urlencode(params)}"
        self.ws: Any = None

    async def open(self) -> int | None:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=WAIT)
        return None

    async def send(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float) -> bytes:
        import websockets

        try:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None) from None
        assert isinstance(data, bytes), data
        return data

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


class DocPeer:
    """One editor: its document, its socket, and what it has heard."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.doc: Doc[Any] = Doc()
        self.text = self.doc.get("doc", type=Text)
        self.synced = False
        self.awareness: dict[int, tuple[int, str]] = {}
        self.closed: int | None = None
        self.frames = 0

    async def open(self) -> int | None:
        return await self.transport.open()

    async def sync(self, timeout: float = WAIT) -> None:
        """Our sync step 1, then read until the server's step 2 arrived."""
        await self.transport.send(sync_frame(STEP1, self.doc.get_state()))
        async with asyncio.timeout(timeout):
            while not self.synced:
                await self.read_one(timeout)

    async def read_one(self, timeout: float = WAIT) -> None:
        try:
            data = await self.transport.recv(timeout)
        except Closed as closed:
            self.closed = closed.code
            raise
        self.frames += 1
        kind, pos = read_var_uint(data, 0)
        if kind == SYNC:
            sub, pos = read_var_uint(data, pos)
            payload, _ = read_var_bytes(data, pos)
            if sub == STEP1:
                await self.transport.send(sync_frame(STEP2, self.doc.get_update(payload)))
            else:
                self.doc.apply_update(payload)
                if sub == STEP2:
                    self.synced = True
        elif kind == AWARENESS:
            payload, _ = read_var_bytes(data, pos)
            for client, clock, state in parse_awareness(payload):
                if state == "null":
                    self.awareness.pop(client, None)
                else:
                    self.awareness[client] = (clock, state)

    async def until(self, predicate: Any, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.read_one(timeout)

    async def until_closed(self, timeout: float = WAIT) -> int | None:
        with contextlib.suppress(Closed):
            async with asyncio.timeout(timeout):
                while True:
                    await self.read_one(timeout)
        return self.closed

    async def edit(self, at: int, insert: str = "", delete: int = 0) -> bytes:
        """A local edit (``at`` in UTF-8 bytes, as pycrdt counts), sent as an update."""
        before = self.doc.get_state()
        with self.doc.transaction():
            if delete:
                del self.text[at : at + delete]
            if insert:
                self.text.insert(at, insert)
        update = self.doc.get_update(before)
        await self.transport.send(sync_frame(UPDATE, update))
        return update

    async def send_raw(self, data: bytes | str) -> None:
        await self.transport.send(data)

    def value(self) -> str:
        return str(self.text)

    async def close(self) -> None:
        await self.transport.close()
