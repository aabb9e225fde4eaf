"""Raw asyncio stream clients: SSE over HTTP/1.1 and WebSocket (RFC 6455), no client
library in the way, so the load tool costs the machine as little as possible and the
server's own cost is what the figures show.

A client records, for every event frame it reads, the time it read it, the event's
``seq`` (Tandem) and the load tool's own counter ``bn`` (published in the event's data,
so the peer, which has no seq, is measured the same way).
"""
from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

_SEQ = re.compile(rb'"seq":(\d+)')
_BN = re.compile(rb'"bn":\s?(\d+)')
_TIME = re.compile(rb'"time":"([^"]+)"')


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str  # with its query string
    transport: str  # "sse" | "ws"
    origin: str = ""
    expects_connected: bool = True  # Tandem opens with server.connected; the peer does not


class StreamClient:
    """One connection. ``run`` connects and reads until ``close`` or the server ends it."""

    __slots__ = (
        "endpoint", "keep_time", "seqs", "bns", "times", "event_times", "connected",
        "connected_at", "connect_seconds", "started_at", "headers_at", "head", "heartbeats", "heartbeat_gap", "error",
        "ended", "on_frame", "_last_beat", "_writer", "_task",
    )

    def __init__(self, endpoint: Endpoint, keep_time: bool = False) -> None:
        self.endpoint = endpoint
        self.keep_time = keep_time  # keep each event's own "time" (echo replies)
        self.seqs = array("q")  # -1 where the frame had no seq
        self.bns = array("q")  # -1 where the frame had no bn
        self.times = array("d")  # time.time() when read
        self.event_times: list[bytes] = []
        self.connected = asyncio.Event()
        self.connected_at = 0.0
        self.connect_seconds = 0.0
        # time.perf_counter() when the response head (SSE headers, WebSocket 101) was read:
        # the client's "open" (PROTOCOL §5: the position is fixed before it).
        self.headers_at = 0.0
        self.started_at = 0.0  # time.perf_counter() when run() began connecting
        self.head: int | None = None  # server.connected's last_seq
        self.heartbeats = 0
        self.heartbeat_gap = 0.0  # the longest silence between heartbeats, seconds
        self._last_beat = 0.0
        # Called with every event frame and the time it was read, for scenarios that wait
        # on a particular event.
        self.on_frame: Callable[[bytes, float], None] | None = None
        self.error: str | None = None
        self.ended = False
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def run(self) -> None:
        started = self.started_at = time.perf_counter()
        ep = self.endpoint
        try:
            reader, writer = await asyncio.open_connection(ep.host, ep.port, limit=1 << 22)
            self._writer = writer
            if ep.transport == "ws":
                await self._ws(reader, writer, started)
            else:
                await self._sse(reader, writer, started)
        except asyncio.CancelledError:
            pass
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            self.ended = True
            self.connected.set()  # never leave a waiter hanging on a failed connect
            if self._writer is not None:
                self._writer.close()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            if self.endpoint.transport == "ws" and self._writer is not None:
                try:  # a polite close frame: status 1000, masked as a client must
                    self._writer.write(_masked(0x8, b"\x03\xe8"))
                except Exception:
                    pass
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass

    # ------------------------------------------------------------------ SSE

    async def _sse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float) -> None:
        ep = self.endpoint
        writer.write(
            f"GET {ep.path} HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        self.headers_at = time.perf_counter()
        status = head.split(b" ", 2)[1]
        if status != b"200":
            body = await asyncio.wait_for(reader.read(2000), 5)
            raise ValueError(f"HTTP {status.decode()}: {body[-300:]!r}")
        chunked = b"transfer-encoding: chunked" in head.lower()
        if not ep.expects_connected:
            self._mark_connected(started)
        raw = b""
        pending = b""
        carry = b""
        while True:
            data = await reader.read(1 << 18)
            if not data:
                return
            now = time.time()
            if chunked:
                raw += data
                body = []
                while True:
                    i = raw.find(b"\r\n")
                    if i < 0:
                        break
                    size = int(raw[:i].split(b";", 1)[0], 16)
                    if size == 0:
                        raw = b""
                        break
                    if len(raw) < i + 2 + size + 2:
                        break
                    body.append(raw[i + 2:i + 2 + size])
                    raw = raw[i + 2 + size + 2:]
                data = b"".join(body)
            if b"\r" in data or carry:  # CRLF or CR line ends (sse-starlette's) -> LF
                data = carry + data
                carry = b""
                if data.endswith(b"\r"):  # its LF may come with the next read
                    data, carry = data[:-1], b"\r"
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            pending += data
            if b"\n\n" not in pending:
                continue
            frames = pending.split(b"\n\n")
            pending = frames.pop()
            for frame in frames:
                self._frame(frame, now, started)

    # ------------------------------------------------------------------ WebSocket

    async def _ws(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float) -> None:
        ep = self.endpoint
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {ep.path} HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: {ep.origin}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        self.headers_at = time.perf_counter()
        if head.split(b" ", 2)[1] != b"101":
            raise ValueError(f"WebSocket handshake refused: {head[:100]!r}")
        message = b""
        while True:
            b0, b1 = await reader.readexactly(2)
            size = b1 & 0x7F
            if size == 126:
                size = int.from_bytes(await reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(size) if size else b""
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: a server closes a client that never answers
                writer.write(_masked(0xA, payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if code not in (1000, 4012):
                    self.error = f"closed {code}"
                return
            elif opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    self._frame(message, time.time(), started)
                    message = b""

    # ------------------------------------------------------------------ frames

    def _mark_connected(self, started: float) -> None:
        self.connect_seconds = time.perf_counter() - started
        self.connected_at = time.time()
        self.connected.set()

    def _frame(self, frame: bytes, now: float, started: float) -> None:
        if frame.startswith(b":"):
            self._beat(now)  # the peer's ping comment
            return
        if b'"server.' in frame[:200]:
            if b"server.connected" in frame:
                match = re.search(rb'"last_seq":(\d+)', frame)
                self.head = int(match.group(1)) if match else None
                self._mark_connected(started)
            elif b"server.heartbeat" in frame:
                self._beat(now)
            return
        if frame.startswith(b"retry:"):
            return
        seq = _SEQ.search(frame)
        bn = _BN.search(frame)
        self.seqs.append(int(seq.group(1)) if seq else -1)
        self.bns.append(int(bn.group(1)) if bn else -1)
        self.times.append(now)
        if self.keep_time:
            match = _TIME.search(frame)
            self.event_times.append(match.group(1) if match else b"")
        if self.on_frame is not None:
            self.on_frame(frame, now)

    def _beat(self, now: float) -> None:
        self.heartbeats += 1
        since = self._last_beat or self.connected_at
        if since:
            self.heartbeat_gap = max(self.heartbeat_gap, now - since)
        self._last_beat = now


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


async def connect_all(clients: list[StreamClient], concurrency: int, timeout: float) -> float:
    """Open every client, ``concurrency`` handshakes at a time; returns the seconds it took
    for all to be connected (or to fail)."""
    started = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(client: StreamClient) -> None:
        async with gate:
            client.start()
            try:
                await asyncio.wait_for(client.connected.wait(), timeout)
            except TimeoutError:
                client.error = client.error or "connect timeout"

    await asyncio.gather(*(one(c) for c in clients))
    return time.perf_counter() - started
