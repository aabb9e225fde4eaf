"""``static/js/tandem.js`` in a real Chromium against a real daphne process: events in
order and exactly once, resume, reconnect after going offline, de-duplication, gap
filling, resets, the polling fallback, backoff, WebSocket commands, REST errors and
losing the login.

Each page is logged in (cookie), then moves to ``/healthz`` so that nothing but the test
drives the module. Events are published from Python over REST; the page collects what
the module hands it in ``window.__got``, ``__statuses``, ``__resets``."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest

from tests.conftest import token_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WAIT = 15_000  # ms: the bound on every wait for the browser

# Loads the module and opens one subscription, recording everything it reports.
SUBSCRIBE = """async ([sessionId, options]) => {
  const { Tandem, TandemError } = await import('/static/js/tandem.js');
  window.TandemError = TandemError;
  window.__got = window.__got || [];
  window.__statuses = window.__statuses || [];
  window.__resets = window.__resets || [];
  window.__authLost = window.__authLost || 0;
  window.tandem = window.tandem || new Tandem({ onAuthLost: () => { window.__authLost += 1; } });
  window.sub = window.tandem.subscribe(sessionId, {
    ...options,
    onEvent: (e) => window.__got.push(e),
    onStatus: (s, info) => window.__statuses.push([s, info]),
    onReset: (info) => window.__resets.push(info),
  });
}"""


def rest(live: Any, user: Any) -> httpx.Client:
    return httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=15)


@pytest.fixture
def clients(live: Any) -> Iterator[Any]:
    opened: list[httpx.Client] = []

    def make(user: Any) -> httpx.Client:
        client = rest(live, user)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def publish(client: httpx.Client, session_id: str, n: int, **extra: Any) -> list[int]:
    seqs = []
    for i in range(n):
        response = client.post(
            f"/api/sessions/{session_id}/events/",
            json={"type": "task.progress", "properties": {"i": i, **extra}},
        )
        assert response.status_code == 201, response.text
        seqs.append(response.json()["seq"])
    return seqs


def head(client: httpx.Client, session_id: str) -> int:
    response = client.get(f"/api/sessions/{session_id}/")
    assert response.status_code == 200, response.text
    return int(response.json()["last_seq"])


def page_for(browse: Any, user: Any) -> Any:
    page = browse(user)
    page.goto("/healthz")  # same origin, no page script of its own
    return page


def subscribe(page: Any, session_id: str | None, **options: Any) -> None:
    page.evaluate(SUBSCRIBE, [session_id, options])


def wait_status(page: Any, status: str, timeout: int = WAIT) -> None:
    page.wait_for_function("s => window.sub && window.sub.status === s", arg=status, timeout=timeout)


def wait_persisted(page: Any, n: int, timeout: int = WAIT) -> None:
    page.wait_for_function(
        "n => window.__got.filter(e => e.seq !== null).length >= n", arg=n, timeout=timeout
    )


def persisted(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("window.__got.filter(e => e.seq !== null)")


def seqs(page: Any) -> list[int]:
    return [e["seq"] for e in persisted(page)]


def statuses(page: Any) -> list[str]:
    return [s for s, _ in page.evaluate("window.__statuses")]


def connected_count(page: Any) -> int:
    return int(page.evaluate("window.__got.filter(e => e.type === 'server.connected').length"))


def assert_exactly(page: Any, expected: list[int]) -> None:
    got = seqs(page)
    assert got == expected, f"expected {expected}, got {got}"


# ---------------------------------------------------------------- session streams


def test_events_arrive_in_order_with_their_seqs(browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any) -> None:
    sid = shared_session.id
    page = page_for(browse, alice)
    subscribe(page, sid)
    wait_status(page, "live")
    start = page.evaluate("window.sub.lastSeq")
    assert start == head(clients(alice), sid)  # live only: from the head at connect

    published = publish(clients(bob), sid, 5)
    wait_persisted(page, 5)
    assert_exactly(page, published)
    assert published == list(range(start + 1, start + 6))
    events = persisted(page)
    assert [e["properties"]["i"] for e in events] == [0, 1, 2, 3, 4]
    assert all(e["type"] == "task.progress" and e["session_id"] == sid for e in events)
    assert events[0]["properties"]["published_by"]["username"] == "bob"
    first = page.evaluate("window.__got[0]")
    assert first["type"] == "server.connected" and first["seq"] is None
    assert page.evaluate("window.sub.lastSeq") == published[-1]
    assert statuses(page)[:2] == ["connecting", "live"]


def test_after_resumes_exactly_with_no_gap_and_no_duplicate(browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    before = publish(bob_api, sid, 4)
    page = page_for(browse, alice)
    subscribe(page, sid, after=before[1])  # has seen up to the second
    wait_status(page, "live")
    wait_persisted(page, 2)
    assert page.evaluate("window.__got[0].properties.resumed") is True
    after = publish(bob_api, sid, 3)
    wait_persisted(page, 5)
    assert_exactly(page, before[2:] + after)

    # after=0 is "from the start": the whole log, session.created first.
    page2 = page_for(browse, alice)
    subscribe(page2, sid, after=0)
    total = head(bob_api, sid)
    wait_persisted(page2, total)
    assert_exactly(page2, list(range(1, total + 1)))
    assert persisted(page2)[0]["type"] == "session.created"


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_going_offline_and_back_resumes_without_loss_or_duplicate(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any, transport: str
) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    page = page_for(browse, alice)
    subscribe(page, sid, transport=transport)
    wait_status(page, "live")
    first = publish(bob_api, sid, 1)
    wait_persisted(page, 1)

    page.context.set_offline(True)
    wait_status(page, "offline")
    while_offline = publish(bob_api, sid, 3)  # the server keeps them; the browser cannot hear
    page.context.set_offline(False)
    wait_status(page, "live")
    wait_persisted(page, 4)
    later = publish(bob_api, sid, 2)
    wait_persisted(page, 6)

    assert_exactly(page, first + while_offline + later)
    seen = statuses(page)
    offline_at = seen.index("offline")
    assert seen[offline_at + 1] == "reconnecting"
    assert "live" in seen[offline_at + 2:]
    assert connected_count(page) == 2
    resumed = page.evaluate("window.__got.filter(e => e.type === 'server.connected')[1].properties")
    assert resumed["resumed"] is True


def test_an_overlapping_resume_delivers_nothing_twice(browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    page = page_for(browse, alice)
    subscribe(page, sid, after=0)
    total = head(bob_api, sid)
    first = publish(bob_api, sid, 5)
    wait_persisted(page, total + 5)
    last = page.evaluate("window.sub.lastSeq")
    assert last == first[-1]

    # Make the next resume ask for 4 events it already has: the server replays them.
    rewritten: list[str] = []

    def rewind(route: Any) -> None:
        url = re.sub(r"last_event_id=\d+", f"last_event_id={last - 4}", route.request.url)
        rewritten.append(url)
        route.continue_(url=url)

    page.route("**/stream/**", rewind)
    page.evaluate("window.sub.reconnect()")
    page.wait_for_function("() => window.__got.filter(e => e.type === 'server.connected').length === 2", timeout=WAIT)
    wait_status(page, "live")
    more = publish(bob_api, sid, 2)
    wait_persisted(page, total + 7)
    assert rewritten and f"last_event_id={last - 4}" in rewritten[0]
    assert_exactly(page, list(range(1, total + 1)) + first + more)


def test_a_gap_is_filled_from_the_events_endpoint_before_later_events(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    start = head(bob_api, sid)
    published = publish(bob_api, sid, 4)
    fourth = bob_api.get(f"/api/sessions/{sid}/events/?after={published[2]}&limit=1").json()["events"][0]
    page = page_for(browse, alice)

    # The first stream skips seqs start+1..start+3 and sends only start+4, then ends.
    connected = {
        "seq": None, "session_id": sid, "type": "server.connected", "time": fourth["time"],
        "properties": {"connection_id": "con_fake", "last_seq": published[-1], "resumed": True},
    }
    body = (
        b"retry: 3000\ndata: " + orjson.dumps(connected) + b"\n\n"
        + b"id: %d\ndata: " % fourth["seq"] + orjson.dumps(fourth) + b"\n\n"
    )
    page.route(
        "**/stream/**",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
        times=1,
    )
    subscribe(page, sid, after=start)
    wait_persisted(page, 4)
    assert_exactly(page, published)
    # Then the real stream takes over, resuming after the last one: nothing lost, nothing twice.
    page.wait_for_function("() => window.__got.filter(e => e.type === 'server.connected').length === 2", timeout=WAIT)
    wait_status(page, "live")
    more = publish(bob_api, sid, 2)
    wait_persisted(page, 6)
    assert_exactly(page, published + more)


def test_a_position_beyond_the_head_resets_and_goes_on_from_the_head(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    current = head(bob_api, sid)
    page = page_for(browse, alice)
    subscribe(page, sid, after=current + 1000)
    page.wait_for_function("() => window.__resets.length === 1", timeout=WAIT)
    assert page.evaluate("window.__resets[0]") == {"reason": "unknown_position", "last_seq": current, "session_id": sid}
    types = page.evaluate("window.__got.map(e => e.type)")
    assert types[:2] == ["server.connected", "stream.reset"]
    assert page.evaluate("window.sub.lastSeq") == current
    more = publish(bob_api, sid, 2)
    wait_persisted(page, 2)
    assert_exactly(page, more)
    assert more == [current + 1, current + 2]


def test_a_pruned_position_resets_with_history_expired(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any, settings: Any
) -> None:
    from events_app.services import prune_session

    sid = shared_session.id
    bob_api = clients(bob)
    published = publish(bob_api, sid, 6)
    settings.TANDEM_EVENT_RETENTION_COUNT = 2  # what retention does on its own, done now
    assert prune_session(sid) > 0
    page = page_for(browse, alice)
    subscribe(page, sid, after=1)
    page.wait_for_function("() => window.__resets.length === 1", timeout=WAIT)
    assert page.evaluate("window.__resets[0]") == {
        "reason": "history_expired", "last_seq": published[-1], "session_id": sid,
    }
    assert seqs(page) == []  # no replay after a reset
    more = publish(bob_api, sid, 1)
    wait_persisted(page, 1)
    assert_exactly(page, more)


def test_when_the_stream_cannot_connect_it_polls_then_goes_back_to_streaming(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    page = page_for(browse, alice)
    blocked: list[str] = []

    def block(route: Any) -> None:
        blocked.append(route.request.url)
        route.abort()

    page.route("**/stream/**", block)
    subscribe(page, sid, transportRetryInterval=3000)
    wait_status(page, "polling")
    assert len(blocked) == 3  # three failed attempts in a row, then polling
    assert "live" not in statuses(page)
    published = publish(bob_api, sid, 3)
    wait_persisted(page, 3)
    assert_exactly(page, published)
    assert page.evaluate("window.sub.status") == "polling"

    page.unroute("**/stream/**")
    wait_status(page, "live")  # tried again after transportRetryInterval
    more = publish(bob_api, sid, 2)
    wait_persisted(page, 5)
    assert_exactly(page, published + more)


def test_closing_from_inside_on_status_is_safe(browse: Any, alice: Any, shared_session: Any) -> None:
    page = page_for(browse, alice)
    page.route("**/stream/**", lambda route: route.abort())
    page.evaluate(
        """async (sid) => {
          const { Tandem } = await import('/static/js/tandem.js');
          window.__statuses = [];
          window.sub = new Tandem().subscribe(sid, {
            onStatus: (s) => { window.__statuses.push(s); if (s === 'polling') window.sub.close(); },
          });
        }""",
        shared_session.id,
    )
    wait_status(page, "closed")
    assert page.evaluate("window.__statuses.slice(-2)") == ["polling", "closed"]
    assert not [m for m in page.console_messages if m.startswith("pageerror")], page.console_messages


def test_polling_honours_a_reset(browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    current = head(bob_api, sid)
    page = page_for(browse, alice)
    page.route("**/stream/**", lambda route: route.abort())
    subscribe(page, sid, after=current + 50, pollInterval=500)
    wait_status(page, "polling")
    page.wait_for_function("() => window.__resets.length === 1", timeout=WAIT)
    assert page.evaluate("window.__resets[0]") == {"reason": "unknown_position", "last_seq": current, "session_id": sid}
    assert page.evaluate("window.__got.filter(e => e.type === 'stream.reset').length") == 1
    more = publish(bob_api, sid, 2)
    wait_persisted(page, 2)
    assert_exactly(page, more)


def test_a_reset_handler_that_returns_a_promise_holds_later_events_back(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    bob_api = clients(bob)
    current = head(bob_api, sid)
    page = page_for(browse, alice)
    page.evaluate(
        """async ([sid, after]) => {
          const { Tandem } = await import('/static/js/tandem.js');
          window.__got = [];
          window.sub = new Tandem().subscribe(sid, {
            after,
            onEvent: (e) => window.__got.push(e),
            onReset: () => new Promise((resolve) => { window.__release = resolve; }),
          });
        }""",
        [sid, current + 10],
    )
    page.wait_for_function("() => typeof window.__release === 'function'", timeout=WAIT)
    more = publish(bob_api, sid, 2)  # the page is still "refetching": nothing may arrive
    page.wait_for_function(
        "() => window.sub.status === 'live' && window.__got.some(e => e.type === 'server.connected')", timeout=WAIT
    )
    assert seqs(page) == []
    assert page.evaluate("window.__got.map(e => e.type)") == ["server.connected"]
    page.evaluate("window.__release()")
    wait_persisted(page, 2)
    assert_exactly(page, more)
    assert page.evaluate("window.__got.map(e => e.type)")[:2] == ["server.connected", "stream.reset"]


def test_a_filtered_stream_skips_other_types_without_filling_gaps(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    alice_api = clients(alice)
    page = page_for(browse, alice)
    history_reads: list[str] = []
    stream_urls: list[str] = []
    page.on("request", lambda r: history_reads.append(r.url) if "/events/" in r.url else None)
    page.on("request", lambda r: stream_urls.append(unquote(r.url)) if "/stream/" in r.url else None)
    subscribe(page, sid, types=["task.*"])
    wait_status(page, "live")
    first = publish(clients(bob), sid, 1)
    assert alice_api.patch(f"/api/sessions/{sid}/", json={"title": "Renamed"}).status_code == 200
    second = publish(clients(bob), sid, 1)
    wait_persisted(page, 2)
    assert_exactly(page, first + second)
    assert second[0] == first[0] + 2  # a seq in between, filtered out by the server
    assert history_reads == []  # expected holes are not gaps
    assert len(stream_urls) == 1 and "types=task.*" in stream_urls[0]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_an_outsider_is_closed_not_retried_forever(browse: Any, charlie: Any, shared_session: Any, transport: str) -> None:
    page = page_for(browse, charlie)
    subscribe(page, shared_session.id, transport=transport)
    wait_status(page, "closed")
    info = page.evaluate("window.__statuses.at(-1)[1]")
    assert info["reason"] == "not_found"
    assert "polling" not in statuses(page)
    assert page.evaluate("window.__authLost") == 0


def test_removal_from_the_session_ends_the_subscription(
    browse: Any, alice: Any, carol: Any, shared_session: Any, clients: Any
) -> None:
    page = page_for(browse, carol)
    subscribe(page, shared_session.id)
    wait_status(page, "live")
    response = clients(alice).delete(f"/api/sessions/{shared_session.id}/members/carol/")
    assert response.status_code == 204
    wait_status(page, "closed")
    assert page.evaluate("window.__statuses.at(-1)[1].reason") == "not_found"


def test_deleting_the_session_closes_the_subscription(
    browse: Any, alice: Any, carol: Any, shared_session: Any, clients: Any
) -> None:
    page = page_for(browse, carol)
    subscribe(page, shared_session.id)
    wait_status(page, "live")
    assert clients(alice).delete(f"/api/sessions/{shared_session.id}/").status_code == 204
    wait_status(page, "closed")
    assert page.evaluate("window.__statuses.at(-1)[1].reason") == "session_deleted"
    assert page.evaluate("window.__got.at(-1).type") == "session.deleted"


# ---------------------------------------------------------------- user-level stream


def test_the_user_level_stream_resumes_from_its_cursor(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    alice_api = clients(alice)
    other = alice_api.post("/api/sessions/", json={"title": "Second"}).json()["id"]
    page = page_for(browse, alice)
    subscribe(page, None)
    wait_status(page, "live")
    assert page.evaluate("window.sub.cursor")  # from server.connected
    a = publish(clients(bob), shared_session.id, 2)
    b = publish(alice_api, other, 2)
    wait_persisted(page, 4)
    got = persisted(page)
    assert [(e["session_id"], e["seq"]) for e in got] == [(shared_session.id, s) for s in a] + [(other, s) for s in b]
    assert all(e["cursor"] for e in got)
    cursor = page.evaluate("window.sub.cursor")
    assert cursor == got[-1]["cursor"]
    page.evaluate("window.sub.close()")
    assert page.evaluate("window.sub.status") == "closed"

    # Missed while away: resuming from the cursor gives exactly these, once.
    missed_a = publish(clients(bob), shared_session.id, 2)
    missed_b = publish(alice_api, other, 1)
    page.evaluate("window.__got = []")
    subscribe(page, None, after=cursor)
    wait_persisted(page, 3)
    live_a = publish(clients(bob), shared_session.id, 1)
    wait_persisted(page, 4)
    got = [(e["session_id"], e["seq"]) for e in persisted(page)]
    expected = [(shared_session.id, s) for s in missed_a + live_a] + [(other, s) for s in missed_b]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    for sid in (shared_session.id, other):
        per_session = [s for x, s in got if x == sid]
        assert per_session == sorted(per_session)


def test_the_user_level_stream_backs_off_with_jitter_and_streams_by_the_cookie(
    browse: Any, alice: Any, shared_session: Any
) -> None:
    page = page_for(browse, alice)
    tickets: list[str] = []
    streams: list[str] = []
    page.on("request", lambda r: tickets.append(r.url) if r.url.endswith("/api/auth/ticket/") else None)
    page.route("**/api/stream/**", lambda route: (streams.append(route.request.url), route.abort()))
    subscribe(page, None)
    page.wait_for_function(
        "() => window.__statuses.filter(([s]) => s === 'reconnecting').length >= 3", timeout=WAIT
    )
    delays = page.evaluate("window.__statuses.filter(([s]) => s === 'reconnecting').map(([, i]) => i.delay)")
    # min(30 s, 0.5 s * 2^n) * random[0.5, 1] for n = 0, 1, 2
    for n, delay in enumerate(delays[:3]):
        ceiling = 500 * 2**n
        assert ceiling / 2 - 1 <= delay <= ceiling + 1, (n, delays)
    assert "polling" not in statuses(page)  # the user-level stream has no polling endpoint

    page.unroute("**/api/stream/**")
    wait_status(page, "live")
    stream_urls = list(streams)
    # One request per failed attempt, each followed by one reconnect (EventSource never
    # retried on its own), each by the session cookie with no credential in the URL; a
    # ticket is asked for only to learn, after a failed attempt, whether the user is
    # still signed in.
    reconnects = statuses(page).count("reconnecting")
    assert len(stream_urls) == reconnects
    assert all("ticket=" not in u and "token=" not in u for u in stream_urls)
    assert len(tickets) == reconnects


# ---------------------------------------------------------------- WebSocket


def test_websocket_transport_delivers_events_and_answers_commands(
    browse: Any, alice: Any, bob: Any, shared_session: Any, clients: Any
) -> None:
    sid = shared_session.id
    page = page_for(browse, bob)
    subscribe(page, sid, transport="ws")
    wait_status(page, "live")
    assert page.evaluate("window.__statuses.at(-1)[1].transport") == "ws"
    published = publish(clients(alice), sid, 2)
    wait_persisted(page, 2)

    pong = page.evaluate("window.sub.send({type: 'ping'})")
    assert pong["type"] == "pong" and pong["id"]
    result = page.evaluate(
        "window.sub.send({type: 'publish', event: {type: 'task.progress', properties: {via: 'ws'}}})"
    )
    assert result["type"] == "task.progress" and result["seq"] == published[-1] + 1
    wait_persisted(page, 3)
    assert_exactly(page, published + [result["seq"]])
    # Replies resolve send(); they never reach onEvent.
    assert page.evaluate("window.__got.filter(e => ['ack', 'pong', 'error'].includes(e.type)).length") == 0

    error = page.evaluate(
        """() => window.sub.send({type: 'publish', event: {type: 'server.fake'}})
              .then(() => null, (e) => ({name: e.name, code: e.code, isError: e instanceof window.TandemError,
                                          details: e.details}))"""
    )
    assert error["isError"] and error["name"] == "TandemError" and error["code"] == "validation_error"
    assert error["details"]


def test_websocket_commands_of_a_viewer_are_refused_and_need_a_connection(
    browse: Any, carol: Any, shared_session: Any
) -> None:
    page = page_for(browse, carol)
    subscribe(page, shared_session.id, transport="ws")
    wait_status(page, "live")
    code = page.evaluate(
        "window.sub.send({type: 'publish', event: {type: 'task.progress'}}).then(() => null, (e) => e.code)"
    )
    assert code == "permission_denied"
    page.evaluate("window.sub.close()")
    code = page.evaluate("window.sub.send({type: 'ping'}).then(() => null, (e) => e.code)")
    assert code == "not_connected"
    # An SSE subscription has no command channel.
    subscribe(page, shared_session.id)
    wait_status(page, "live")
    code = page.evaluate("window.sub.send({type: 'ping'}).then(() => null, (e) => e.code)")
    assert code == "not_connected"


# ---------------------------------------------------------------- REST


def test_rest_calls_use_the_cookie_and_csrf_and_errors_are_tandem_errors(
    browse: Any, alice: Any, charlie: Any, shared_session: Any
) -> None:
    page = page_for(browse, alice)
    subscribe(page, shared_session.id)
    sid = shared_session.id
    created = page.evaluate(
        "sid => window.tandem.post(`/api/sessions/${sid}/events/`, {type: 'task.progress', properties: {x: 1}})", sid
    )
    assert created["seq"] >= 1 and created["properties"]["published_by"]["username"] == "alice"
    renamed = page.evaluate("sid => window.tandem.patch(`/api/sessions/${sid}/`, {title: 'Renamed'})", sid)
    assert renamed["title"] == "Renamed"
    removed = page.evaluate("sid => window.tandem.del(`/api/sessions/${sid}/members/carol/`)", sid)
    assert removed is None  # 204
    listed = page.evaluate("() => window.tandem.get(location.origin + '/api/sessions/')")  # a `next` link
    assert [row["id"] for row in listed["results"]] == [sid]

    catch = """(args) => window.tandem.request(...args).then(
        () => null,
        (e) => ({name: e.name, status: e.status, code: e.code, details: e.details, message: e.message,
                 isError: e instanceof window.TandemError}))"""
    invalid = page.evaluate(catch, ["POST", f"/api/sessions/{sid}/events/", {"type": "server.nope"}])
    assert invalid["isError"] and invalid["status"] == 400 and invalid["code"] == "validation_error"
    assert "type" in invalid["details"]

    outsider = page_for(browse, charlie)
    outsider.evaluate(
        "() => import('/static/js/tandem.js')"
        ".then(m => { window.TandemError = m.TandemError; window.tandem = new m.Tandem(); })"
    )
    hidden = outsider.evaluate(catch, ["GET", f"/api/sessions/{sid}/"])
    assert hidden == {
        "name": "TandemError", "status": 404, "code": "not_found", "details": {},
        "message": hidden["message"], "isError": True,
    }


def test_a_network_failure_is_a_tandem_error_with_status_zero(browse: Any, alice: Any) -> None:
    page = page_for(browse, alice)
    page.evaluate("() => import('/static/js/tandem.js').then(m => { window.tandem = new m.Tandem(); })")
    page.route("**/api/sessions/", lambda route: route.abort())
    error = page.evaluate("() => window.tandem.get('/api/sessions/').then(() => null, (e) => [e.status, e.code])")
    assert error == [0, "network_error"]


def test_losing_the_login_calls_on_auth_lost_and_closes_the_subscription(
    browse: Any, alice: Any, shared_session: Any
) -> None:
    page = page_for(browse, alice)
    subscribe(page, shared_session.id)
    wait_status(page, "live")
    page.context.clear_cookies()
    error = page.evaluate("() => window.tandem.get('/api/sessions/').then(() => null, (e) => [e.status, e.code])")
    assert error == [401, "not_authenticated"]
    assert page.evaluate("window.__authLost") == 1

    page.evaluate("window.sub.reconnect()")  # the next attempt is refused: 401, and REST says why
    wait_status(page, "closed")
    assert page.evaluate("window.__statuses.at(-1)[1].reason") == "auth_lost"
