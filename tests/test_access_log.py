"""Tokens and tickets in query strings are never written to a log: a real server
process's output, access log included, is read back after streams opened with both."""
from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.conftest import token_for

pytestmark = [pytest.mark.slow]


def test_server_log_has_every_request_but_no_token_or_ticket(servers: Any, shared_session: Any, bob: Any) -> None:
    (server,) = servers(1)
    token = token_for(bob)
    headers = {"Authorization": f"Bearer {token}"}
    ticket = httpx.post(f"{server.url}/api/auth/ticket/", headers=headers, timeout=5).json()["ticket"]
    path = f"/api/sessions/{shared_session.id}/stream/"
    for query in (f"token={token}", f"ticket={ticket}", f"types=message.*&ticket={ticket}"):
        with httpx.stream("GET", f"{server.url}{path}?{query}", timeout=5) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    # A bad token in the URL, and a token on a REST URL where it is ignored.
    assert httpx.get(f"{server.url}{path}?token=not-a-jwt-but-secret", timeout=5).status_code == 401
    httpx.get(f"{server.url}/api/sessions/?token={token}", timeout=5)
    deadline = time.monotonic() + 10
    while server.log().count(f"{path}?") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()
    log = server.log()
    assert log.count(f"{path}?") >= 4, log[-3000:]  # the streams were logged...
    assert token not in log and ticket not in log and "not-a-jwt-but-secret" not in log
    assert token.split(".")[2] not in log  # not even the signature part
    assert f"{path}?token=[redacted]" in log and f"{path}?types=message.*&ticket=[redacted]" in log
