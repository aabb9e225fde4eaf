"""Streams from pages on other origins, in a real Chromium against a real server:

- a fetch-based SSE client on an allowed origin sends ``Authorization`` and
  ``Last-Event-ID`` (a CORS preflight) and reads the stream; on any other origin the
  browser refuses it;
- ``new EventSource(url, {withCredentials: true})`` on an allowed origin authenticates by
  the session cookie, and the browser's own reconnect after the server restarts (later
  than a ticket lives) resumes with ``Last-Event-ID`` and misses nothing;
- the UI's own client (static/js/tandem.js) opens its EventSource with the cookie, no
  credential in the URL.

The other origin is a page Playwright serves at another port of the same host (the same
site, so the session cookie goes with credentialed requests)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.db import transaction

from events_app.services import publish
from tests.conftest import PASSWORD, start_server, token_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WAIT = 15_000  # ms


@pytest.fixture
def origins(other_origins: list[str]) -> dict[str, str]:
    allowed, other = other_origins
    return {"allowed": allowed, "other": other}


@pytest.fixture
def server(servers: Any, origins: dict[str, str]) -> Any:
    (live,) = servers(1, TANDEM_ALLOWED_ORIGINS=origins["allowed"], TANDEM_TICKET_SECONDS="2")
    return live


@pytest.fixture
def context(chromium: Any, server: Any, origins: dict[str, str]) -> Iterator[Any]:
    context = chromium.new_context(base_url=server.url)
    context.set_default_timeout(WAIT)
    yield context
    context.close()


def log_in(context: Any, user: Any) -> Any:
    page = context.new_page()
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(user.get_username())
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/$"))
    return page


def post_event(server: Any, user: Any, session_id: str, i: int) -> int:
    response = httpx.post(
        f"{server.url}/api/sessions/{session_id}/events/", json={"type": "task.progress", "properties": {"i": i}},
        headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=10,
    )
    assert response.status_code == 201, response.text
    return int(response.json()["seq"])


FETCH_STREAM = """async ([url, token, lastEventId]) => {
  const response = await fetch(url, {headers: {Authorization: `Bearer ${token}`, "Last-Event-ID": lastEventId}});
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  const events = [];
  while (!events.some(e => e.seq !== null)) {
    const {value, done} = await reader.read();
    if (done) break;
    text += decoder.decode(value, {stream: true});
    let end;
    while ((end = text.indexOf("\\n\\n")) >= 0) {
      const block = text.slice(0, end);
      text = text.slice(end + 2);
      const data = block.split("\\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\\n");
      if (data) events.push(JSON.parse(data));
    }
  }
  reader.cancel();
  return {status: response.status, events};
}"""


def test_fetch_sse_client_on_an_allowed_origin_sends_authorization_and_last_event_id(
    context: Any, server: Any, origins: dict[str, str], shared_session: Any, alice: Any, bob: Any
) -> None:
    sid = shared_session.id
    first = post_event(server, bob, sid, 1)
    post_event(server, bob, sid, 2)
    url = f"{server.url}/api/sessions/{sid}/stream/"
    page = context.new_page()
    page.goto(f"{origins['allowed']}/app")
    got = page.evaluate(FETCH_STREAM, [url, token_for(alice), str(first)])
    assert got["status"] == 200
    assert got["events"][0]["type"] == "server.connected" and got["events"][0]["properties"]["resumed"] is True
    # Replayed after the Last-Event-ID it sent.
    assert [e["seq"] for e in got["events"] if e["seq"] is not None] == [first + 1]

    elsewhere = context.new_page()
    elsewhere.goto(f"{origins['other']}/app")
    refused = elsewhere.evaluate(
        f"(args) => ({FETCH_STREAM})(args).then(() => 'read', (err) => err.name)",
        [url, token_for(alice), str(first)],
    )
    assert refused == "TypeError"  # the browser's CORS failure


def test_preflights_on_stream_endpoints_answer_allowed_origins_only(
    server: Any, origins: dict[str, str], shared_session: Any
) -> None:
    for path in [f"/api/sessions/{shared_session.id}/stream/", "/api/stream/"]:
        request = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization, last-event-id"}
        allowed = httpx.options(f"{server.url}{path}", headers={"Origin": origins["allowed"], **request})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == origins["allowed"]
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert {"authorization", "last-event-id"} <= set(allowed.headers["access-control-allow-headers"].split(", "))
        assert "GET" in allowed.headers["access-control-allow-methods"]
        other = httpx.options(f"{server.url}{path}", headers={"Origin": origins["other"], **request})
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-credentials" not in other.headers
        # Not a preflight: streams are read with GET.
        assert httpx.options(f"{server.url}{path}").status_code == 405


EVENT_SOURCE = """(url) => {
  window.got = []; window.opens = 0; window.errors = 0;
  const source = new EventSource(url, {withCredentials: true});
  source.onopen = () => { window.opens += 1; };
  source.onerror = () => { window.errors += 1; };
  source.onmessage = (m) => window.got.push({id: m.lastEventId, event: JSON.parse(m.data)});
  window.source = source;
}"""


def test_event_source_with_credentials_reconnects_by_itself_after_a_restart_later_than_a_ticket_lives(
    context: Any, server: Any, origins: dict[str, str], shared_session: Any, alice: Any, bob: Any, tmp_path: Any
) -> None:
    sid = shared_session.id
    log_in(context, alice)
    page = context.new_page()
    page.goto(f"{origins['allowed']}/app")
    page.evaluate(EVENT_SOURCE, f"{server.url}/api/sessions/{sid}/stream/")
    page.wait_for_function("() => window.got.some(e => e.event.type === 'server.connected')")
    before = [post_event(server, bob, sid, i) for i in range(3)]
    page.wait_for_function(f"() => window.got.some(e => e.event.seq === {before[-1]})")

    server.proc.kill()
    server.proc.wait()
    page.wait_for_timeout(2500)  # longer than the server's tickets live (2 s)
    with transaction.atomic():
        away = [publish(sid, "task.progress", {"away": i}).seq for i in range(3)]
    restarted = start_server(
        {"TANDEM_AGENT_MODE": "inline", "TANDEM_ALLOWED_ORIGINS": origins["allowed"], "TANDEM_TICKET_SECONDS": "2"},
        tmp_path, name="restarted", port=server.port,
    )
    try:
        page.wait_for_function("() => window.opens >= 2", timeout=WAIT)  # the browser's own reconnect
        after = [post_event(restarted, bob, sid, i) for i in range(2)]
        page.wait_for_function(f"() => window.got.some(e => e.event.seq === {after[-1]})")
        got = page.evaluate("window.got")
    finally:
        restarted.stop()
    connected = [g["event"] for g in got if g["event"]["type"] == "server.connected"]
    assert len(connected) == 2 and connected[1]["properties"]["resumed"] is True
    seqs = [g["event"]["seq"] for g in got if g["event"]["seq"] is not None]
    assert seqs == list(range(before[0], after[-1] + 1)) and set(away) <= set(seqs)
    assert "stream.reset" not in [g["event"]["type"] for g in got]


def test_the_ui_streams_with_the_session_cookie_and_no_credential_in_the_url(
    context: Any, server: Any, shared_session: Any, alice: Any
) -> None:
    page = log_in(context, alice)
    # The sessions page follows the user-level stream over SSE. The first stream response:
    # the page may drop a request and open another while it starts.
    with page.expect_response(lambda response: "/api/stream/" in response.url) as answered:
        page.goto("/")
    request = answered.value.request
    assert "ticket=" not in request.url and "token=" not in request.url, request.url
    assert request.header_value("authorization") is None
    # Admitted with nothing in the URL and no Authorization: by the cookie. (Asked of the
    # response: the request's cookie header reaches Playwright only now and then.)
    assert answered.value.status == 200
