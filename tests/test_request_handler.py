"""Django requests under ASGI go through ``project.handler.OneHopHandler``: the whole
request (Django's signals, middleware, view, the body and the response's close) in one
call on a small pool of threads, the sending on the event loop. These drive the real ASGI
application in process: what a client gets is Django's own answer, streamed responses
arrive whole, and requests no longer start a thread each."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from channels.testing import HttpCommunicator

from project.asgi import application
from tests.conftest import token_for

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent


async def call(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw = [(b"host", b"testserver"), *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    if body:
        raw.append((b"content-length", str(len(body)).encode()))
    response: dict[str, Any] = await HttpCommunicator(application, method, path, body=body, headers=raw).get_response(timeout=10)
    return response


def header(response: dict[str, Any], name: str) -> str | None:
    for key, value in response["headers"]:
        if key.decode().lower() == name:
            return str(value.decode("latin-1"))
    return None


async def test_a_static_file_arrives_whole_through_the_streamed_response() -> None:
    response = await call("GET", "/static/js/tandem.js")
    assert response["status"] == 200
    assert response["body"] == (ROOT / "static" / "js" / "tandem.js").read_bytes()
    assert "javascript" in (header(response, "content-type") or "")


async def test_a_post_is_answered_with_the_message_as_its_event_shows_it(shared_session: Any, bob: Any) -> None:
    body = orjson.dumps({"parts": [{"type": "text", "text": "hi"}], "if_busy": "queue"})
    response = await call(
        "POST", f"/api/sessions/{shared_session.id}/messages/", body,
        {"authorization": f"Bearer {token_for(bob)}", "content-type": "application/json"},
    )
    assert response["status"] == 202, response["body"]
    posted = orjson.loads(response["body"])
    assert posted["message"]["parts"] == [{"id": posted["message"]["parts"][0]["id"], "type": "text", "text": "hi"}]


async def test_errors_keep_their_one_shape_and_status(shared_session: Any, charlie: Any) -> None:
    outsider = await call(
        "GET", f"/api/sessions/{shared_session.id}/messages/", headers={"authorization": f"Bearer {token_for(charlie)}"}
    )
    assert outsider["status"] == 404
    assert orjson.loads(outsider["body"])["error"]["code"] == "not_found"
    anonymous = await call("GET", f"/api/sessions/{shared_session.id}/messages/")
    assert anonymous["status"] == 401
    assert header(anonymous, "www-authenticate") == 'Bearer realm="api"'


async def test_requests_reuse_a_pool_of_threads_instead_of_starting_one_each(
    shared_session: Any, bob: Any, settings: Any
) -> None:
    auth = {"authorization": f"Bearer {token_for(bob)}"}
    path = f"/api/sessions/{shared_session.id}/messages/"
    await call("GET", path, headers=auth)  # the pool has its first thread
    started: list[str] = []
    start = threading.Thread.start

    def counting(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    threading.Thread.start = counting  # type: ignore[method-assign]
    try:
        for _ in range(20):
            assert (await call("GET", path, headers=auth))["status"] == 200
    finally:
        threading.Thread.start = start  # type: ignore[method-assign]
    # The pool grows to its size at most (a thread still finishing its last request when
    # the next one comes makes it start another); Django's own handler started a thread
    # for every request.
    assert all(name.startswith("tandem-request") for name in started), started
    assert len(started) < settings.TANDEM_MAX_CONCURRENT_REQUESTS


async def test_every_hop_of_a_streamed_response_runs_in_the_requests_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A streamed response is read a chunk per hop to a request thread: what the first hop
    # set up for the request (here the script prefix; the database connection too) is
    # what the later hops see.
    from django.http import StreamingHttpResponse
    from django.urls import get_script_prefix

    from project.handler import OneHopHandler

    def chunks() -> Any:
        for _ in range(3):
            yield get_script_prefix().encode() + b";"

    handler = OneHopHandler()
    monkeypatch.setattr(handler, "get_response", lambda request: StreamingHttpResponse(chunks()))
    communicator = HttpCommunicator(handler, "GET", "/tandem/anything", headers=[(b"host", b"testserver")])
    communicator.scope["root_path"] = "/tandem"
    response = await communicator.get_response(timeout=10)
    assert response["status"] == 200
    assert response["body"] == b"/tandem/;/tandem/;/tandem/;"
