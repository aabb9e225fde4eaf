"""The message queue across real server processes (§3 "Posting while a reply runs"): three
people posting at once through two processes keep one order, seen the same by every
stream; a queue outlives the process running its reply."""
from __future__ import annotations

import threading
from typing import Any

import pytest

from sessions_app import services
from sessions_app.models import Session
from tests.conftest import make_user, token_for
from tests.test_agent_workers import FAST_LEASE, words
from tests.test_cross_process import db_log
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def replies_text(events: list[dict[str, Any]]) -> dict[str, str]:
    """Each reply's final text, by id."""
    return {
        e["properties"]["message_id"]: e["properties"]["part"]["text"]
        for e in events
        if e["type"] == "message.part.updated" and "delta" not in e["properties"]
        and e["properties"]["part"]["type"] == "text"
    }


def turns(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(user message, the reply that answered it) in the order the turns came."""
    found = []
    for i, e in enumerate(events):
        if e["type"] == "message.updated" and "superseded_by" not in e["properties"]:
            reply = next(
                x for x in events[i:] if x["type"] == "message.created"
                and x["properties"]["message"]["role"] == "assistant"
            )
            found.append((e["properties"]["message_id"], reply["properties"]["message"]["id"]))
    return found


def test_three_people_posting_at_once_through_two_processes_keep_one_order(
    servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    dave = make_user("dave")
    services.add_member(shared_session, username="dave", role="editor")
    server_a, server_b = servers(2, redis=True, TANDEM_ECHO_DELAY_MS="20")
    sid = shared_session.id
    streams = [
        sse_streams(server.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
        for server in (server_a, server_b)
    ]
    head = [s.wait_for_type("server.connected")["properties"]["last_seq"] for s in streams][0]
    with api_client(server_a, alice) as client:
        first = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": words(40)}]})
        assert first.status_code == 202 and first.json()["reply_id"], first.text

    posted: dict[str, list[str]] = {}  # text → message id, by poster
    failures: list[str] = []
    go = threading.Barrier(3)

    def poster(user: Any, server: Any, name: str) -> None:
        with api_client(server, user) as client:
            go.wait()
            for i in range(4):
                text = f"{name}-{i}"
                response = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": text}]})
                if response.status_code != 202 or not response.json().get("queued"):
                    failures.append(f"{text}: {response.status_code} {response.text}")
                    continue
                posted.setdefault(name, []).append(response.json()["message"]["id"])

    threads = [
        threading.Thread(target=poster, args=(alice, server_a, "alice")),
        threading.Thread(target=poster, args=(bob, server_b, "bob")),
        threading.Thread(target=poster, args=(dave, server_b, "dave")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert sum(len(v) for v in posted.values()) == 12

    for stream in streams:
        stream.wait_for(
            lambda evs: len([e for e in evs if e["type"] == "message.completed"]) == 13
            and evs[-1]["type"] == "session.status" and evs[-1]["properties"]["status"] == {"type": "idle"},
            timeout=60,
        )
    log = [e for e in db_log(server_b, bob, sid) if e["seq"] > head]
    # Every stream, whichever process it is on, saw the whole log, in order, once.
    for stream in streams:
        assert [e["seq"] for e in stream.persisted()] == [e["seq"] for e in log]
        assert [(e["type"], e["properties"]) for e in stream.persisted()] == [(e["type"], e["properties"]) for e in log]
    assert [e["seq"] for e in log] == list(range(head + 1, head + 1 + len(log)))

    # The turns came in posting order: the order in which the queued messages were stored.
    queued_order = [
        e["properties"]["message"]["id"] for e in log
        if e["type"] == "message.created" and e["properties"]["message"]["status"] == "queued"
    ]
    answered = turns(log)
    assert [user for user, _ in answered] == queued_order
    # Each person's messages kept their own order too, and each reply echoes its message.
    for ids in posted.values():
        assert [i for i in queued_order if i in ids] == ids
    texts = {e["properties"]["message"]["id"]: e["properties"]["message"]["parts"][0]["text"] for e in log
             if e["type"] == "message.created" and e["properties"]["message"]["role"] == "user"}
    finals = replies_text(log)
    assert [finals[reply] for _, reply in answered] == [texts[user] for user, _ in answered]
    statuses = [e["properties"]["status"]["type"] for e in log if e["type"] == "session.status"]
    assert statuses.count("idle") == 1 and statuses[-1] == "idle"


@pytest.mark.parametrize("mode", ["worker", "inline"])
def test_the_queue_survives_the_death_of_the_process_running_the_reply(
    mode: str, servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    # A lease a little longer than the kill test's: the survivors must keep theirs on a
    # loaded machine while the dead runner's lapses (an overdue survivor's reply would be
    # reaped as interrupted too).
    env = {**FAST_LEASE, "TANDEM_RUN_LEASE_SECONDS": "4", "TANDEM_ECHO_DELAY_MS": "30"}
    if mode == "worker":
        (watcher,) = servers(1, redis=True, workers=2, **env)
        poster = watcher
    else:
        poster, watcher = servers(2, redis=True, **env)  # the first reply runs on the poster
    sid = shared_session.id
    stream = sse_streams(watcher.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(poster, bob) as client:
        first = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": words(400)}]})
        reply_id = first.json()["reply_id"]
        queued = [
            client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": t}]}).json()
            for t in ("after one", "after two")
        ]
    assert [q["position"] for q in queued] == [1, 2]
    stream.wait_for(lambda evs: any(e["type"] == "message.part.updated" and e["properties"].get("delta") for e in evs))
    if mode == "worker":
        from sessions_app.models import ReplyRun

        runner = ReplyRun.objects.get(pk=reply_id).runner
        victim = next(w for w in servers.workers if f":{w.proc.pid}:" in runner)
    else:
        victim = poster
    victim.proc.kill()
    done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=60)
    assert done["properties"]["error"]["code"] == "interrupted"
    stream.wait_for(
        lambda evs: len([e for e in evs if e["type"] == "message.completed"]) == 3
        and evs[-1]["type"] == "session.status" and evs[-1]["properties"]["status"] == {"type": "idle"},
        timeout=60,
    )
    events = stream.persisted()
    answered = turns(events)
    assert [user for user, _ in answered] == [q["message"]["id"] for q in queued]
    finals = replies_text(events)
    completed = {e["properties"]["message_id"]: e["properties"] for e in events if e["type"] == "message.completed"}
    assert [completed[reply]["status"] for _, reply in answered] == ["completed", "completed"], completed
    assert [finals[reply] for _, reply in answered] == ["after one", "after two"], [
        (e["type"], e["properties"]) for e in events if e["properties"].get("message_id") in dict(answered).values()
    ]
