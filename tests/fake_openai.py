"""A real local HTTP server speaking OpenAI's streaming Chat Completions, for the
``openai`` agent's tests: a real socket, chunked transfer encoding, a flush after every
chunk, and an ear for the client hanging up.

Script the next responses with ``fake_openai.script(...)``; each request takes the next
one. Build them with ``stream(...)`` (events: chunk dicts, raw strings such as comment
lines or broken JSON, ``Hang`` pauses) and ``error(...)``.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass(frozen=True)
class Hang:
    """Send nothing for ``seconds`` (or until the client hangs up, or the server stops),
    then drop the connection without finishing the response."""

    seconds: float


@dataclass
class Scripted:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    steps: list[bytes | Hang] = field(default_factory=list)  # a streamed body
    body: bytes | None = None  # a whole body instead


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``choices=False`` gives the usage-only shape."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": (
            [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}] if choices else []
        ),
        "usage": usage,
    }


def text_chunks(*pieces: str, role_first: bool = True) -> list[dict[str, Any]]:
    events = [chunk({"role": "assistant"})] if role_first else []
    events += [chunk({"content": p}) for p in pieces]
    return events + [chunk(finish_reason="stop")]


def tool_call(index: int, *, id: str | None = None, name: str | None = None, arguments: str = "") -> dict[str, Any]:
    """One ``delta.tool_calls`` fragment; OpenAI sends id and name only on the first."""
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        fragment |= {"id": id, "type": "function"}
        fragment["function"]["name"] = name
    return chunk({"tool_calls": [fragment]})


def stream(*events: dict[str, Any] | str | Hang, newline: str = "\n", done: bool = True) -> Scripted:
    """An SSE body: a dict is one ``data:`` event, a string is written as it is (plus the
    newline), a Hang pauses. ``done`` ends it with ``data: [DONE]``."""
    steps: list[bytes | Hang] = []
    for event in events:
        if isinstance(event, Hang):
            steps.append(event)
        elif isinstance(event, str):
            steps.append((event + newline).encode())
        else:
            steps.append(f"data: {json.dumps(event)}{newline}{newline}".encode())
    if done:
        steps.append(f"data: [DONE]{newline}{newline}".encode())
    return Scripted(headers={"Content-Type": "text/event-stream"}, steps=steps)


def error(status: int, message: str, *, headers: dict[str, str] | None = None) -> Scripted:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return Scripted(
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
        body=json.dumps(body).encode(),
    )


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # the JSON bodies, in arrival order
        self.headers: list[dict[str, str]] = []  # their headers, lower-cased names
        self.disconnects = 0  # responses the client hung up on while the server waited
        self._script: deque[Scripted] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def script(self, *responses: Scripted) -> None:
        with self._lock:
            self._script.extend(responses)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _take(self, headers: dict[str, str], body: bytes) -> Scripted:
        with self._lock:
            self.headers.append(headers)
            self.requests.append(json.loads(body) if body else {})
            if self._script:
                return self._script.popleft()
        return error(400, "fake_openai: no response was scripted for this request")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked, as the real API
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a client that hangs up abruptly is part of the tests
            pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            scripted = error(404, f"fake_openai: no route {self.path}")
        else:
            scripted = self.server.fake._take({k.lower(): v for k, v in self.headers.items()}, body)
        self.send_response(scripted.status)
        for name, value in scripted.headers.items():
            self.send_header(name, value)
        if scripted.body is not None:
            self.send_header("Content-Length", str(len(scripted.body)))
            self.end_headers()
            self.wfile.write(scripted.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for step in scripted.steps:
                if isinstance(step, Hang):
                    self._hang(step.seconds)
                    self.close_connection = True  # the response is left unfinished
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(step), step))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away mid-write
            self.close_connection = True

    def _hang(self, seconds: float) -> None:
        fake = self.server.fake
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not fake._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if not readable:
                continue
            try:
                peeked = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                peeked = b""
            if not peeked:  # EOF or reset: the client closed the connection
                with fake._lock:
                    fake.disconnects += 1
                return
            time.sleep(0.02)


@pytest.fixture
def fake_openai(settings: Any) -> Iterator[FakeOpenAI]:
    """A running fake, with the agent's settings pointed at it: short timeout and
    near-instant retry backoff, so failure paths stay fast."""
    fake = FakeOpenAI()
    fake.start()
    settings.TANDEM_OPENAI_BASE_URL = fake.url
    settings.TANDEM_OPENAI_API_KEY = "sk-test"
    settings.TANDEM_OPENAI_MODEL = "fake-model"
    settings.TANDEM_OPENAI_TIMEOUT = 0.5
    settings.TANDEM_OPENAI_MAX_RETRIES = 2
    settings.TANDEM_OPENAI_RETRY_BASE_SECONDS = 0.01
    try:
        yield fake
    finally:
        fake.stop()
