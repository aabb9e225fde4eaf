"""The ``doc`` scenario: N editors typing at a steady rate into one shared document over
its WebSocket (the y-websocket wire protocol, ``pycrdt`` documents), spread over one or
two server processes (``--url`` and ``--url2``, which must share Redis and the database).

Each keystroke inserts a token ``e<editor>.<n> `` at a random word boundary of the
editor's text and sends it as a Yjs update. Every other editor notes when the token
arrives (a ``pycrdt`` text observer), so the report has, per update, its latency from
the send to each other editor (p50/p99/max), how many deliveries never came, whether
all editors end with the same text, and that text equals what the server stored
(``GET …/doc/``); plus the servers' CPU seconds during the typing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import time
from typing import Any
from urllib.parse import urlencode

from pycrdt import Doc, Text, TextEvent

from bench.procinfo import Server
from bench.stats import percentiles
from bench.targets import BenchError, TandemTarget, Target, _split

SYNC, AWARENESS = 0, 1
STEP1, STEP2, UPDATE = 0, 1, 2
TOKEN = re.compile(r"e(\d+)\.(\d+) ")


def _var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame(kind: int, payload: bytes) -> bytes:
    return bytes((SYNC, kind)) + _var_uint(len(payload)) + payload


def _read_uint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


class Editor:
    def __init__(self, index: int, url: str, shared: Shared) -> None:
        self.index = index
        self.url = url
        self.shared = shared
        self.doc: Doc[Any] = Doc()
        self.text = self.doc.get("doc", type=Text)
        self.text.observe(self._observed)
        self.ws: Any = None
        self.synced = asyncio.Event()
        self.typed = 0
        self.reader: asyncio.Task[None] | None = None
        self.error = ""

    def _observed(self, event: TextEvent) -> None:
        now = time.monotonic()
        for op in event.delta:
            inserted = op.get("insert") if isinstance(op, dict) else None
            if not isinstance(inserted, str):
                continue
            for m in TOKEN.finditer(inserted):
                if int(m.group(1)) != self.index:
                    self.shared.arrived(m.group(0), now)

    async def connect(self) -> None:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=30)
        self.reader = asyncio.ensure_future(self._read())
        await self.ws.send(_frame(STEP1, self.doc.get_state()))
        await asyncio.wait_for(self.synced.wait(), 30)

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if not isinstance(data, bytes) or not data:
                    continue
                kind, pos = _read_uint(data, 0)
                if kind != SYNC:
                    continue
                sub, pos = _read_uint(data, pos)
                length, pos = _read_uint(data, pos)
                payload = data[pos : pos + length]
                if sub == STEP1:
                    await self.ws.send(_frame(STEP2, self.doc.get_update(payload)))
                else:
                    self.doc.apply_update(payload)
                    if sub == STEP2:
                        self.synced.set()
        except Exception as exc:  # the socket ended: the report says so
            self.error = f"{type(exc).__name__}: {exc}"[:200]

    async def type_one(self, rng: random.Random) -> None:
        token = f"e{self.index}.{self.typed} "
        self.typed += 1
        current = str(self.text)
        # A word boundary (all text is ASCII: code points are bytes here).
        spaces = [i + 1 for i, c in enumerate(current) if c == " "]
        at = rng.choice([0, *spaces]) if spaces else 0
        before = self.doc.get_state()
        self.text.insert(at, token)
        update = self.doc.get_update(before)
        self.shared.sent(token, time.monotonic())
        await self.ws.send(_frame(UPDATE, update))

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


class Shared:
    """Send times of every token, and each delivery's latency."""

    def __init__(self, editors: int) -> None:
        self.editors = editors
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.deliveries = 0
        self.expected: int | None = None  # known once the typing ends
        self.all_in = asyncio.Event()

    def sent(self, token: str, now: float) -> None:
        self.sent_at[token] = now

    def arrived(self, token: str, now: float) -> None:
        at = self.sent_at.get(token)
        if at is not None:
            self.latencies.append(now - at)
            self.deliveries += 1
            if self.expected is not None and self.deliveries >= self.expected:
                self.all_in.set()


async def doc(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    if not isinstance(target, TandemTarget):
        raise BenchError("the doc scenario needs Tandem")
    urls = [target.url] + ([args.url2.rstrip("/")] if args.url2 else [])
    for url in urls:
        _split(url)
    await target.setup(1)
    session = target.sessions[0]
    query = urlencode({"token": target.token})
    socket_urls = [f"{u.replace('http://', 'ws://')}/ws/sessions/{session}/doc/?{query}" for u in urls]
    servers = [Server(_split(u)[1]) for u in urls]
    shared = Shared(args.clients)
    editors = [Editor(i, socket_urls[i % len(urls)], shared) for i in range(args.clients)]
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def connect(editor: Editor) -> None:
        async with gate:
            try:
                await editor.connect()
            except Exception as exc:
                raise BenchError(f"editor {editor.index} could not connect: {exc}") from None

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(connect(e) for e in editors)), args.timeout)
    connect_seconds = time.monotonic() - started
    await asyncio.sleep(args.settle)
    rate = args.rate[0]
    cpu_before = [s.cpu_seconds() for s in servers]
    client_cpu_before = time.process_time()

    async def typist(editor: Editor, seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.random() / rate)  # spread the editors over the period
        period = 1.0 / rate
        due = time.monotonic()
        end = due + args.duration
        while due < end:
            await editor.type_one(rng)
            due += period
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    typing_started = time.monotonic()
    await asyncio.gather(*(typist(e, i) for i, e in enumerate(editors)))
    typing_seconds = time.monotonic() - typing_started
    expected = sum(e.typed for e in editors) * (len(editors) - 1)

    def converged() -> bool:
        first = str(editors[0].text)
        return shared.deliveries >= expected and all(str(e.text) == first for e in editors)

    drain_started = time.monotonic()
    shared.expected = expected
    if shared.deliveries >= expected:
        shared.all_in.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shared.all_in.wait(), args.drain)
    settle_seconds = time.monotonic() - drain_started
    cpu_after = [s.cpu_seconds() for s in servers]
    client_cpu = time.process_time() - client_cpu_before
    text = str(editors[0].text)
    r = await target.http.get(f"/api/sessions/{session}/doc/", headers=target.headers)
    stored = r.json() if r.status_code == 200 else {}
    for e in editors:
        await e.close()
    updates = sum(e.typed for e in editors)
    cpu = [round(b - a, 2) for a, b in zip(cpu_before, cpu_after, strict=True)]
    return {
        "editors": len(editors),
        "processes": len(urls),
        "rate_per_editor": rate,
        "typing_seconds": round(typing_seconds, 2),
        "connect_seconds": round(connect_seconds, 2),
        "updates": updates,
        "updates_per_second": round(updates / typing_seconds, 1) if typing_seconds else None,
        "expected_deliveries": expected,
        "delivered": shared.deliveries,
        "lost": max(0, expected - shared.deliveries),
        "latency_ms": percentiles(shared.latencies),
        "converged": converged(),
        "converge_after_typing_seconds": round(settle_seconds, 2),
        "stored_matches": stored.get("text") == text,
        "stored_version": stored.get("version"),
        "doc_chars": len(text),
        "errors": [e.error for e in editors if e.error],
        "client_cpu_seconds": round(client_cpu, 2),
        "server": {
            "pids": [s.pids for s in servers],
            "cpu_seconds": cpu,
            "cpu_percent_of_one_core": [round(100 * c / typing_seconds, 1) for c in cpu] if typing_seconds else None,
            "server_us_per_update": round(1e6 * sum(cpu) / updates, 1) if updates else None,
        },
    }
