"""What the load tool talks to: Tandem (auth, sessions, custom events, messages) or the
seed reference peer (channels, no auth, publish over REST). Both give the tool stream
endpoints and a way to publish the event numbered ``bn``."""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from urllib.parse import urlparse

import httpx
import orjson

from bench.clients import Endpoint

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVENT_TYPE = "bench.tick"


class BenchError(Exception):
    pass


def _split(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname not in LOOPBACK:
        raise BenchError(f"{url}: the load tool only targets http:// on loopback")
    return parsed.hostname or "127.0.0.1", parsed.port or 80


class RawPoster:
    """``POST``s of JSON over keep-alive HTTP/1.1 connections on plain asyncio streams, for
    the requests on the measured path (message posts, published events): the tool shares
    the machine's cores with the server it measures, and httpx spent several times the CPU
    of this per request. One connection per request in flight, kept for the next."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open: set[asyncio.StreamWriter] = set()

    async def post(self, path: str, payload: object, headers: dict[str, str]) -> tuple[int, bytes]:
        body = orjson.dumps(payload)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        ).encode() + body
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.open.add(writer)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip().lower()
            if fields.get(b"transfer-encoding") == b"chunked":
                data = b""
                while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
                    data += (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")
            else:
                data = await reader.readexactly(int(fields.get(b"content-length", b"0")))
        except BaseException:
            self._close(writer)
            raise
        if fields.get(b"connection") == b"close":
            self._close(writer)
        else:
            self.idle.append((reader, writer))
        return status, data

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self.open.discard(writer)
        writer.close()

    def aclose(self) -> None:
        for writer in list(self.open):
            self._close(writer)
        self.idle.clear()


class Target:
    name = "target"
    supports_ws = False
    supports_messages = False

    def __init__(self, url: str, publishers: int = 8) -> None:
        self.url = url.rstrip("/")
        self.host, self.port = _split(self.url)
        self.http = httpx.AsyncClient(
            base_url=self.url, timeout=60,
            limits=httpx.Limits(max_connections=publishers, max_keepalive_connections=publishers),
        )
        self.poster = RawPoster(self.host, self.port)
        self.sessions: list[str] = []

    async def setup(self, sessions: int) -> None:
        raise NotImplementedError

    def endpoint(self, session: str, transport: str, types: str | None) -> Endpoint:
        raise NotImplementedError

    def resume(self, endpoint: Endpoint, last_seq: int) -> Endpoint:
        """The same stream, resumed after ``last_seq`` (where the target can resume)."""
        return endpoint

    async def publish(self, session: str, bn: int) -> int | None:
        """Publish event ``bn``; returns its seq where the target has one."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.poster.aclose()
        await self.http.aclose()


class TandemTarget(Target):
    name = "tandem"
    supports_ws = True
    supports_messages = True

    def __init__(self, url: str, publishers: int = 8, agent: str = "echo") -> None:
        super().__init__(url, publishers)
        self.agent = agent
        self.token = ""
        self.headers: dict[str, str] = {}

    async def setup(self, sessions: int) -> None:
        name, password = f"bench{secrets.token_hex(5)}", secrets.token_urlsafe(18)
        r = await self.http.post("/api/auth/register/", json={"username": name, "password": password})
        if r.status_code != 201:
            raise BenchError(f"register: HTTP {r.status_code} {r.text[:200]}")
        r = await self.http.post("/api/auth/token/", json={"username": name, "password": password})
        r.raise_for_status()
        self.token = r.json()["access"]
        self.headers = {"Authorization": f"Bearer {self.token}"}
        gate = asyncio.Semaphore(16)

        async def create(i: int) -> str:
            async with gate:
                r = await self.http.post(
                    "/api/sessions/", json={"title": f"bench {i}", "agent": self.agent}, headers=self.headers
                )
                if r.status_code != 201:
                    raise BenchError(f"create session: HTTP {r.status_code} {r.text[:200]}")
                return str(r.json()["id"])

        self.sessions = list(await asyncio.gather(*(create(i) for i in range(sessions))))

    def endpoint(self, session: str, transport: str, types: str | None) -> Endpoint:
        query = f"token={self.token}" + (f"&types={types}" if types else "")
        path = f"/api/sessions/{session}/stream/?{query}" if transport == "sse" else f"/ws/sessions/{session}/?{query}"
        return Endpoint(self.host, self.port, path, transport, origin=self.url)

    def resume(self, endpoint: Endpoint, last_seq: int) -> Endpoint:
        # The query parameter rather than the header: the same for SSE and WebSocket.
        return replace(endpoint, path=f"{endpoint.path}&last_event_id={last_seq}")

    async def publish(self, session: str, bn: int) -> int | None:
        status, body = await self.poster.post(
            f"/api/sessions/{session}/events/", {"type": EVENT_TYPE, "properties": {"bn": bn}}, self.headers
        )
        if status != 201:
            raise BenchError(f"publish: HTTP {status} {body[:200]!r}")
        return int(orjson.loads(body)["seq"])

    async def post_message(self, session: str, text: str) -> int:
        status, _ = await self.poster.post(
            f"/api/sessions/{session}/messages/", {"parts": [{"type": "text", "text": text}]}, self.headers
        )
        return status

    async def state(self, session: str) -> tuple[str, int]:
        """The session's status type and its head (last_seq)."""
        r = await self.http.get(f"/api/sessions/{session}/", headers=self.headers)
        r.raise_for_status()
        data = r.json()
        return str(data["status"]["type"]), int(data["last_seq"])

    async def metrics(self) -> dict[str, float]:
        """The process's own gauges, for the leak checks (one process answers)."""
        r = await self.http.get("/metrics")
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            if line.startswith("tandem_") and " " in line:
                key, value = line.rsplit(" ", 1)
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out


class PeerTarget(Target):
    """The seed-design peer (``bench/peer.py``): ``/stream/{channel}``,
    ``POST /publish/{channel}``."""

    name = "peer"

    async def setup(self, sessions: int) -> None:
        stamp = f"{int(time.time())}{secrets.token_hex(3)}"
        self.sessions = [f"bench-{stamp}-{i}" for i in range(sessions)]

    def endpoint(self, session: str, transport: str, types: str | None) -> Endpoint:
        if transport != "sse":
            raise BenchError("the peer serves SSE only")
        return Endpoint(self.host, self.port, f"/stream/{session}", "sse", expects_connected=False)

    async def publish(self, session: str, bn: int) -> int | None:
        status, body = await self.poster.post(f"/publish/{session}", {"event": EVENT_TYPE, "data": {"bn": bn}}, {})
        if status != 200:
            raise BenchError(f"publish: HTTP {status} {body[:200]!r}")
        return None


def make_target(kind: str, url: str, publishers: int, agent: str = "echo") -> Target:
    if kind == "peer":
        return PeerTarget(url, publishers)
    return TandemTarget(url, publishers, agent)


def spread(sessions: list[str], clients: int, transport: str) -> list[tuple[str, str]]:
    """Client i follows session i mod S; ``mixed`` alternates SSE and WebSocket so every
    session with two or more clients has both."""
    out: list[tuple[str, str]] = []
    for i in range(clients):
        t = transport if transport != "mixed" else ("sse", "ws")[(i // len(sessions)) % 2]
        out.append((sessions[i % len(sessions)], t))
    return out
