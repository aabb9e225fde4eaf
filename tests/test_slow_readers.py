"""Slow clients cost bounded memory: readers that stop reading are disconnected once
``TANDEM_STREAM_QUEUE`` events wait for them, and resume losing nothing.

This needs an ASGI server with flow control (uvicorn: a write to a full socket waits),
so the waiting events pile up where Tandem can count them. daphne accepts every write
at once and buffers it itself, so there a stalled reader's backlog grows in daphne's
buffers instead (measured in docs/PERFORMANCE.md).
"""
from __future__ import annotations

import re
import socket
import time
from typing import Any

import httpx
import pytest

from tests.conftest import token_for

pytestmark = [pytest.mark.slow]

READERS, EVENTS, PAYLOAD = 10, 300, 60_000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def test_stalled_readers_are_cut_off_with_bounded_memory_and_resume_without_loss(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    (server,) = servers(1, ASGI_SERVER="uvicorn", TANDEM_STREAM_QUEUE="50", TANDEM_MAX_CONNECTIONS_PER_USER="100")
    sid, token = shared_session.id, token_for(bob)
    stalled = []
    for _ in range(READERS):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /api/sessions/{sid}/stream/?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stalled.append(sock)
    time.sleep(1)
    before = rss_mb(server.proc.pid)
    payload = "x" * PAYLOAD
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        for i in range(EVENTS):
            response = client.post(f"/api/sessions/{sid}/events/", json={"type": "bench.big", "properties": {"i": i, "p": payload}})
            assert response.status_code == 201
        deadline = time.monotonic() + 20
        disconnects = 0.0
        while time.monotonic() < deadline:
            metrics = client.get("/metrics").text
            found = re.search(r"^tandem_slow_client_disconnects_total (\S+)$", metrics, re.MULTILINE)
            disconnects = float(found.group(1)) if found else 0.0
            if disconnects >= READERS:
                break
            time.sleep(0.2)
        head = client.get(f"/api/sessions/{sid}/").json()["last_seq"]
    growth = rss_mb(server.proc.pid) - before
    offered = READERS * EVENTS * PAYLOAD / 2**20
    print(f"\nslow readers: {READERS} cut off of {READERS}; RSS +{growth:.1f} MB for {offered:.0f} MB offered")
    assert disconnects == READERS
    assert growth < 80, f"RSS grew {growth:.1f} MB for {offered:.0f} MB offered"
    for sock in stalled:
        sock.close()
    # A cut-off reader resumes from its last id and loses nothing.
    resumed = sse_streams(server.url, f"/api/sessions/{sid}/stream/", token=token_for(alice), headers={"Last-Event-ID": "0"})
    resumed.wait_for_seq(head, timeout=30)
    assert resumed.seqs() == list(range(1, head + 1))
