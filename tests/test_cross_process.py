"""Two real daphne processes on one database and one Redis: whatever is published through
one process reaches streams on the other, complete, in seq order, exactly once."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.conftest import token_for
from tests.test_sse_real_socket import api_client, publish_custom

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WORDS = " ".join(f"word{i}" for i in range(60))


def db_log(server: Any, user: Any, session_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with api_client(server, user) as client:
        after = 0
        while True:
            page = client.get(f"/api/sessions/{session_id}/events/", params={"after": after, "limit": 1000})
            assert page.status_code == 200, page.text
            body = page.json()
            assert body["reset"] is False
            if not body["events"]:
                return events
            events += body["events"]
            after = body["events"][-1]["seq"]


def text_of_reply(events: list[dict[str, Any]], reply_id: str) -> tuple[str, str]:
    """(concatenated deltas, final text) of the reply's single text part."""
    deltas = "".join(
        e["properties"]["delta"]
        for e in events
        if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id
        and "delta" in e["properties"]
    )
    finals = [
        e["properties"]["part"]["text"]
        for e in events
        if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id
        and "delta" not in e["properties"]
    ]
    return deltas, finals[-1]


def test_stream_on_one_process_gets_every_event_published_through_the_other_in_log_order(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id
    stream = sse_streams(server_a.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    head = stream.wait_for_type("server.connected")["properties"]["last_seq"]

    started = time.monotonic()
    with api_client(server_b, bob) as client:
        custom = publish_custom(client, sid, 40)
        posted = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": WORDS}]})
        assert posted.status_code == 202, posted.text
        reply_id = posted.json()["reply_id"]
        more = publish_custom(client, sid, 10, start=40)  # interleaves with the streaming reply
    stream.wait_for_type("message.completed", message_id=reply_id, timeout=20)
    idle = stream.wait_for(
        lambda evs: [e for e in evs if e["type"] == "session.status" and e["properties"]["status"]["type"] == "idle"],
        timeout=10,
    )
    log = db_log(server_b, bob, sid)
    final_seq = log[-1]["seq"]
    stream.wait_for_seq(final_seq)
    elapsed = time.monotonic() - started
    time.sleep(0.2)  # room for a late duplicate

    streamed = stream.persisted()
    expected = [e for e in log if e["seq"] > head]
    assert [e["seq"] for e in streamed] == list(range(head + 1, final_seq + 1))
    assert [e["seq"] for e in streamed] == [e["seq"] for e in expected]
    assert [e["type"] for e in streamed] == [e["type"] for e in expected]
    assert streamed == expected  # byte-for-byte the same envelopes as the log
    assert set(custom + more) <= {e["seq"] for e in streamed}
    assert idle
    deltas, final_text = text_of_reply(streamed, reply_id)
    assert deltas == WORDS and final_text == WORDS
    print(f"\ncross-process: {len(streamed)} events in {elapsed:.2f}s = {len(streamed) / elapsed:.0f} events/s")


def test_clients_on_each_process_see_identical_seq_sequences_under_concurrent_publishers(
    servers: Any, shared_session: Any, alice: Any, bob: Any, carol: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id
    path = f"/api/sessions/{sid}/stream/"
    on_a = sse_streams(server_a.url, path, token=token_for(alice))
    on_b = sse_streams(server_b.url, path, token=token_for(carol))
    head_a = on_a.wait_for_type("server.connected")["properties"]["last_seq"]
    head_b = on_b.wait_for_type("server.connected")["properties"]["last_seq"]
    assert head_a == head_b

    per_writer = 25
    errors: list[BaseException] = []

    def writer(server: Any, user: Any, start: int) -> None:
        try:
            with api_client(server, user) as client:
                publish_custom(client, sid, per_writer, start=start)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(server_a, bob, 0)),
        threading.Thread(target=writer, args=(server_b, bob, 1000)),
        threading.Thread(target=writer, args=(server_a, alice, 2000)),
        threading.Thread(target=writer, args=(server_b, alice, 3000)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    final = head_a + 4 * per_writer
    on_a.wait_for_seq(final)
    on_b.wait_for_seq(final)
    time.sleep(0.2)
    expected = list(range(head_a + 1, final + 1))
    assert on_a.seqs() == expected
    assert on_b.seqs() == expected
    assert on_a.persisted() == on_b.persisted()
    assert sorted(e["properties"]["i"] for e in on_a.persisted()) == sorted(
        i for start in (0, 1000, 2000, 3000) for i in range(start, start + per_writer)
    )


def test_abort_through_the_process_not_running_the_reply_cancels_it(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, TANDEM_ECHO_DELAY_MS="30")
    sid = shared_session.id
    stream = sse_streams(server_a.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    text = " ".join(f"w{i}" for i in range(300))  # ~9 s at 30 ms a word
    with api_client(server_b, bob) as on_b, api_client(server_a, alice) as on_a:
        posted = on_b.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": text}]})
        assert posted.status_code == 202, posted.text
        reply_id = posted.json()["reply_id"]
        stream.wait_for(
            lambda evs: any("delta" in e["properties"] for e in evs if e["type"] == "message.part.updated")
        )
        aborted = on_a.post(f"/api/sessions/{sid}/abort/", json={})
        assert aborted.status_code == 200 and aborted.json() == {"aborted": True}
        done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=2)
        assert done["properties"]["status"] == "cancelled"
        stream.wait_for(
            lambda evs: evs[-1]["type"] == "session.status" and evs[-1]["properties"]["status"] == {"type": "idle"},
            timeout=2,
        )
        deltas, final_text = text_of_reply(stream.persisted(), reply_id)
        assert deltas == final_text and 0 < len(final_text) < len(text)
        assert text.startswith(final_text)
        assert on_a.get(f"/api/sessions/{sid}/").json()["status"] == {"type": "idle"}


def test_abort_sent_right_after_posting_through_the_other_process_cancels_the_reply(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, TANDEM_ECHO_DELAY_MS="30")
    sid = shared_session.id
    stream = sse_streams(server_a.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    text = " ".join(f"w{i}" for i in range(300))
    with api_client(server_b, bob) as on_b, api_client(server_a, alice) as on_a:
        for _ in range(3):
            posted = on_b.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": text}]})
            assert posted.status_code == 202, posted.text
            reply_id = posted.json()["reply_id"]
            # No wait at all: the run on B may not be listening for aborts yet.
            assert on_a.post(f"/api/sessions/{sid}/abort/", json={}).json() == {"aborted": True}
            done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=2)
            assert done["properties"]["status"] == "cancelled"
            stream.wait_for(
                lambda evs: evs[-1]["type"] == "session.status"
                and evs[-1]["properties"]["status"] == {"type": "idle"},
                timeout=2,
            )


def test_removing_a_member_through_one_process_closes_their_streams_on_the_other_within_a_second(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True)
    stream = sse_streams(server_a.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(bob))
    stream.wait_for_type("server.connected")
    with api_client(server_b, alice) as client:
        started = time.monotonic()
        assert client.delete(f"/api/sessions/{shared_session.id}/members/bob/").status_code == 204
    stream.wait_for(lambda _: stream.ended, timeout=1.0)
    print(f"\nremoved member's stream on the other process closed after {(time.monotonic() - started) * 1000:.0f} ms")
