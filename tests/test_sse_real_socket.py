"""SSE over a real TCP socket against a real daphne process: the headers a proxy and a
browser rely on, frames that arrive as they happen (not when the response ends), the
server noticing that the client went away, and resume with ``Last-Event-ID``.

``SSEClient`` speaks HTTP/1.1 on a plain socket (chunked decoding and SSE framing by
hand) from a thread of its own, so nothing between the server and the test can buffer.
The other real-process test modules use it too.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import token_for, wait_until

pytestmark = [pytest.mark.slow]


class SSEClient:
    """One SSE stream on a raw socket. ``frames`` holds every parsed frame in arrival
    order: ``{"id": str | None, "event": str | None, "retry": str | None, "data": dict | None,
    "at": monotonic time}``."""

    def __init__(
        self, base_url: str, path: str, *, token: str | None = None,
        headers: dict[str, str] | None = None, connect_timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (443 if https else 80)
        self.sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        if https:  # through a TLS proxy (tests/test_deploy_nginx.py)
            self.sock = (tls or ssl.create_default_context()).wrap_socket(self.sock, server_hostname=self.host)
        lines = [f"GET {path} HTTP/1.1", "Accept: text/event-stream"]
        if not any(key.lower() == "host" for key in (headers or {})):
            lines.append(f"Host: {self.host}:{self.port}")
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers: dict[str, str] = {}
        for line in header_lines:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self.frames: list[dict[str, Any]] = []
        self.raw_reads: list[tuple[float, bytes]] = []  # every decoded body chunk, when it came
        self.ended = False  # the server ended the body (or the socket)
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._closing = False
        self.sock.settimeout(60)  # bounded: no test waits longer than this for a byte
        self._thread = threading.Thread(target=self._run, name="sse-client", daemon=True)
        if self.status == 200:
            self._thread.start()
        else:
            self.body = self._read_plain_body()

    # ------------------------------------------------------------ reading

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._buffer += self._recv()
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += self._recv()
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _read_plain_body(self) -> bytes:
        if self.chunked:
            out = b""
            while True:
                chunk = self._next_chunk()
                if chunk is None:
                    return out
                out += chunk
        length = int(self.headers.get("content-length", "0"))
        return self._read_exact(length)

    def _next_chunk(self) -> bytes | None:
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            self._read_until(b"\r\n")
            return None
        data = self._read_exact(size)
        self._read_exact(2)
        return data

    def _run(self) -> None:
        text = b""
        try:
            while True:
                if self.chunked:
                    chunk = self._next_chunk()
                    if chunk is None:
                        break
                else:
                    chunk, self._buffer = self._buffer or self._recv(), b""
                now = time.monotonic()
                text += chunk
                parsed = []
                while b"\n\n" in text:
                    raw, _, text = text.partition(b"\n\n")
                    parsed.append(self._parse(raw.decode(), now))
                with self._cond:
                    self.raw_reads.append((now, chunk))
                    self.frames.extend(parsed)
                    self._cond.notify_all()
        except (EOFError, OSError) as exc:
            if not self._closing:
                self.error = exc
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    @staticmethod
    def _parse(raw: str, at: float) -> dict[str, Any]:
        frame: dict[str, Any] = {"id": None, "event": None, "retry": None, "data": None, "at": at}
        for line in raw.split("\n"):
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                frame["data"] = orjson.loads(value)
            elif key in ("id", "event", "retry"):
                frame[key] = value
        return frame

    # ------------------------------------------------------------ querying

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [f["data"] for f in self.frames if f["data"] is not None]

    def persisted(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seq"] is not None]

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.persisted()]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate([f["data"] for f in self.frames if f["data"] is not None])
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.ended:
                    raise AssertionError(
                        f"stream condition not met within {timeout}s (ended={self.ended}, "
                        f"error={self.error!r}); got types "
                        f"{[f['data']['type'] for f in self.frames if f['data']][-30:]}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_for_type(self, type_name: str, timeout: float = 10.0, **props: Any) -> dict[str, Any]:
        def found(events: list[dict[str, Any]]) -> dict[str, Any] | None:
            for event in events:
                if event["type"] == type_name and all(
                    event["properties"].get(k) == v for k, v in props.items()
                ):
                    return event
            return None

        return self.wait_for(found, timeout)  # type: ignore[no-any-return]

    def wait_for_seq(self, seq: int, timeout: float = 10.0) -> None:
        self.wait_for(lambda events: any(e["seq"] is not None and e["seq"] >= seq for e in events), timeout)

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def api_client(server: Any, user: Any) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=15
    )


def publish_custom(client: httpx.Client, session_id: str, n: int, start: int = 0) -> list[int]:
    seqs = []
    for i in range(start, start + n):
        response = client.post(
            f"/api/sessions/{session_id}/events/", json={"type": "task.progress", "properties": {"i": i}}
        )
        assert response.status_code == 201, response.text
        seqs.append(response.json()["seq"])
    return seqs


# ---------------------------------------------------------------- tests


def test_stream_response_has_sse_headers_and_starts_with_retry_then_server_connected(
    servers: Any, shared_session: Any, alice: Any, sse_streams: Any
) -> None:
    (server,) = servers(1)
    stream = sse_streams(server.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(alice))
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "content-length" not in stream.headers
    connected = stream.wait_for_type("server.connected")
    assert stream.frames[0]["retry"] == "3000" and stream.frames[0]["data"] == connected
    assert stream.frames[0]["id"] is None
    assert connected["seq"] is None
    assert connected["properties"]["last_seq"] == shared_session.last_seq
    assert connected["properties"]["resumed"] is False


def test_frames_arrive_while_the_response_is_still_open(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    (server,) = servers(1)
    stream = sse_streams(server.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(alice))
    # server.connected is readable before anything is published: the server did not
    # buffer the body waiting for more.
    stream.wait_for_type("server.connected")
    assert not stream.ended
    with api_client(server, bob) as client:
        for i in range(3):
            (seq,) = publish_custom(client, shared_session.id, 1, start=i)
            # Each event is on the socket before the next one is even published.
            stream.wait_for_seq(seq)
            frame = [f for f in stream.frames if f["data"] and f["data"]["seq"] == seq][0]
            assert frame["id"] == str(seq)
            assert frame["data"]["properties"]["i"] == i
    assert not stream.ended
    assert len(stream.raw_reads) >= 4  # preamble/connected, then one read per event at least


def test_server_notices_a_closed_socket_and_presence_drops_to_zero(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True)
    stream = sse_streams(server_a.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(server_b, bob) as client:

        def health() -> dict[str, Any]:
            response = client.get(f"/api/sessions/{shared_session.id}/health/")
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

        def presence() -> list[dict[str, Any]]:
            response = client.get(f"/api/sessions/{shared_session.id}/presence/")
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

        wait_until(lambda: health()["connections"] == 1, timeout=5)
        rows = presence()
        assert [(r["user"]["username"], r["connections"], r["transports"]) for r in rows] == [
            ("alice", 1, ["sse"])
        ]
        stream.close()  # the client goes away without a word
        wait_until(lambda: health()["connections"] == 0, timeout=5, interval=0.1)
        assert presence() == []
    assert server_a.proc.poll() is None


def test_resume_over_a_real_socket_gets_exactly_the_missed_events_then_live_ones(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    (server,) = servers(1)
    path = f"/api/sessions/{shared_session.id}/stream/"
    with api_client(server, bob) as client:
        first = sse_streams(server.url, path, token=token_for(alice))
        first.wait_for_type("server.connected")
        before = publish_custom(client, shared_session.id, 3, start=0)
        first.wait_for_seq(before[-1])
        assert first.seqs() == before
        last_id = [f["id"] for f in first.frames if f["id"] is not None][-1]
        assert last_id == str(before[-1])
        first.close()  # mid-stream, while more is about to happen

        missed = publish_custom(client, shared_session.id, 4, start=3)
        second = sse_streams(server.url, path, token=token_for(alice), headers={"Last-Event-ID": last_id})
        connected = second.wait_for_type("server.connected")
        assert connected["properties"]["resumed"] is True
        assert connected["properties"]["last_seq"] == missed[-1]
        second.wait_for_seq(missed[-1])
        live = publish_custom(client, shared_session.id, 2, start=7)
        second.wait_for_seq(live[-1])
        time.sleep(0.2)  # room for a duplicate to show up, if the server sent one
        assert second.seqs() == missed + live
        assert [e["properties"]["i"] for e in second.persisted()] == list(range(3, 9))
        assert second.events[0]["type"] == "server.connected"
