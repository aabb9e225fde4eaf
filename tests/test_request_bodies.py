"""Request bodies are read, bounded and timed, before a request takes one of the process's
few places for Django requests (project/asgi.py ``read_body``), against real server
processes over raw sockets.

daphne (Twisted) reads every body completely before the application sees the request, so
there an unfinished body never reaches the app at all (and Twisted drops a connection idle
for 60 s); the deadline and the refusal of an oversized ``Content-Length`` before the body
is sent can only be shown under uvicorn, which hands the body over as it arrives."""
from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import token_for

pytestmark = [pytest.mark.slow]


def connect(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def head(method: str, path: str, server: Any, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        return chunk

    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += more()
            body, rest = body + rest[:size], rest[size + 2 :]
            if size == 0:
                return int(status_line.split()[1]), headers, body
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += more()
    return int(status_line.split()[1]), headers, rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_unfinished_bodies_do_not_hold_up_other_requests(asgi_server: str, servers: Any, alice: Any) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    auth = {"Authorization": f"Bearer {token_for(alice)}"}
    stalled = []
    for _ in range(12):  # more than the 8 places (TANDEM_MAX_CONCURRENT_REQUESTS) there are
        sock = connect(server)
        sock.sendall(
            head("POST", "/api/sessions/", server, {**auth, "Content-Type": "application/json", "Content-Length": "100"})
            + b'{"title": "never fin'
        )
        stalled.append(sock)
    try:
        time.sleep(0.5)  # let the server take them all in
        with httpx.Client(base_url=server.url, headers=auth, timeout=10) as client:
            created = client.post("/api/sessions/", json={"title": "meanwhile"})
            listed = client.get("/api/sessions/")
        assert created.status_code == 201, created.text
        assert listed.status_code == 200
        assert "meanwhile" in [s["title"] for s in listed.json()["results"]]
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.5)  # the server notices they left
    assert not [line for line in server.log().splitlines() if "ERROR" in line or "Traceback" in line], server.log()


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(servers: Any, alice: Any) -> None:
    (server,) = servers(1, ASGI_SERVER="uvicorn", TANDEM_REQUEST_BODY_TIMEOUT="1")
    sock = connect(server)
    sock.sendall(
        head("POST", "/api/sessions/", server, {
            "Authorization": f"Bearer {token_for(alice)}", "Content-Type": "application/json", "Content-Length": "40",
        })
        + b'{"title": '
    )
    status, headers, body = read_response(sock)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert closed_by_server(sock)
    sock.close()


def test_an_oversized_content_length_is_refused_before_the_body_is_sent(servers: Any, alice: Any) -> None:
    (server,) = servers(1, ASGI_SERVER="uvicorn")
    sock = connect(server)
    # Expect: 100-continue, as curl sends for large bodies: the server must answer 413
    # instead of inviting the 50 MB.
    sock.sendall(
        head("POST", "/api/sessions/", server, {
            "Authorization": f"Bearer {token_for(alice)}", "Content-Type": "application/json",
            "Content-Length": "50000000", "Expect": "100-continue",
        })
    )
    status, headers, body = read_response(sock)
    assert status == 413
    error = orjson.loads(body)["error"]
    assert error["code"] == "payload_too_large"
    assert 0 < error["details"]["limit_bytes"] < 50_000_000
    assert closed_by_server(sock)
    sock.close()


@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_a_chunked_json_body_is_read_and_one_over_the_limit_refused(asgi_server: str, servers: Any, alice: Any) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    auth = {"Authorization": f"Bearer {token_for(alice)}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"}

    def chunked(parts: list[bytes]) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

    sock = connect(server)
    sock.sendall(head("POST", "/api/sessions/", server, auth) + chunked([b'{"title": "sent ', b'in chunks"}']))
    status, _, body = read_response(sock)
    sock.close()
    assert status == 201, body
    assert orjson.loads(body)["title"] == "sent in chunks"

    sock = connect(server)
    big = b'{"title": "' + b"x" * 400_000 + b'"}'
    try:
        sock.sendall(head("POST", "/api/sessions/", server, auth) + chunked([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before we finished sending: the answer is still there to read
    status, _, body = read_response(sock)
    sock.close()
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "payload_too_large"
