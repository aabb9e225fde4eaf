"""Where replies run, with real processes: ``run_agents`` workers in worker mode, the
server itself in inline mode; replies outlive their clients, abort reaches whichever
process runs them, and a killed runner's reply ends ``interrupted``."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from sessions_app.models import Session
from tests.conftest import token_for
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# Short leases so a dead runner is noticed in seconds rather than the default ~25 s.
# TANDEM_TEST_KILL_LEASE=20 measures the kill test with the production default.
FAST_LEASE = {"TANDEM_RUN_LEASE_SECONDS": os.environ.get("TANDEM_TEST_KILL_LEASE", "2")}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def post(client: Any, session_id: str, text: str) -> str:
    response = client.post(f"/api/sessions/{session_id}/messages/", json={"parts": [{"type": "text", "text": text}]})
    assert response.status_code == 202, response.text
    return str(response.json()["reply_id"])


def wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def idle(stream: Any) -> Any:
    return stream.wait_for(
        lambda evs: evs[-1]["type"] == "session.status" and evs[-1]["properties"]["status"] == {"type": "idle"}
    )


def streamed_text(stream: Any, reply_id: str) -> tuple[str, str | None]:
    """(deltas so far, final text if the part was closed) of the reply's text part."""
    updates = [
        e["properties"] for e in stream.persisted()
        if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id
    ]
    deltas = "".join(u["delta"] for u in updates if "delta" in u)
    finals = [u["part"]["text"] for u in updates if "delta" not in u and u["part"]["type"] == "text"]
    return deltas, (finals[-1] if finals else None)


def test_workers_run_replies_and_servers_only_queue_them(
    servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, workers=1)
    sid = shared_session.id
    stream = sse_streams(server_b.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(server_a, bob) as client:
        first = post(client, sid, "ran by a worker")
        stream.wait_for_type("message.completed", message_id=first)
        assert streamed_text(stream, first) == ("ran by a worker", "ran by a worker")
        idle(stream)

        # With the worker gone, a reply waits in the queue: no server runs it.
        servers.workers[0].stop()
        second = post(client, sid, "waits for a worker")
        time.sleep(1.5)
        assert streamed_text(stream, second) == ("", None)
        assert client.get(f"/api/sessions/{sid}/").json()["status"] == {"type": "busy"}
        servers(0, redis=True, workers=1)  # a new worker takes it
        done = stream.wait_for_type("message.completed", message_id=second, timeout=15)
        assert done["properties"]["status"] == "completed"
        assert streamed_text(stream, second) == ("waits for a worker", "waits for a worker")


def test_two_workers_share_the_replies_of_many_sessions(
    servers: Any, alice: Any, sse_streams: Any
) -> None:
    (server,) = servers(1, redis=True, workers=2)
    with api_client(server, alice) as client:
        sessions = [client.post("/api/sessions/", json={"title": f"s{i}"}).json()["id"] for i in range(6)]
        replies = {sid: post(client, sid, f"reply in {sid}") for sid in sessions}
        for sid, reply_id in replies.items():
            def completed(sid: str = sid, reply_id: str = reply_id) -> bool:
                events = client.get(f"/api/sessions/{sid}/events/", params={"types": "message.completed"}).json()
                return any(e["properties"]["message_id"] == reply_id for e in events["events"])

            wait_for(completed, timeout=15)
            message = client.get(f"/api/sessions/{sid}/messages/").json()["results"][-1]
            assert message["status"] == "completed"
            assert message["parts"][0]["text"] == f"reply in {sid}"


def test_reply_keeps_running_when_every_client_disconnects(
    servers: Any, shared_session: Session, bob: Any
) -> None:
    (server,) = servers(1, redis=True, workers=1, TANDEM_ECHO_DELAY_MS="20")
    sid = shared_session.id
    text = words(60)
    with api_client(server, bob) as client:
        reply_id = post(client, sid, text)
    # No stream was ever open and the posting client is gone.
    with api_client(server, bob) as client:
        def finished() -> dict[str, Any] | None:
            messages = client.get(f"/api/sessions/{sid}/messages/").json()["results"]
            reply = next(m for m in messages if m["id"] == reply_id)
            return reply if reply["status"] != "streaming" else None

        reply = wait_for(finished, timeout=20)
    assert reply["status"] == "completed" and reply["parts"][0]["text"] == text


@pytest.mark.parametrize("mode", ["worker", "inline"])
def test_abort_cancels_within_a_second_wherever_the_reply_runs(
    mode: str, servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    workers = 1 if mode == "worker" else 0
    server_a, server_b = servers(2, redis=True, workers=workers, TANDEM_ECHO_DELAY_MS="30")
    sid = shared_session.id
    stream = sse_streams(server_a.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(server_b, bob) as on_b, api_client(server_a, alice) as on_a:
        reply_id = post(on_b, sid, words(300))
        stream.wait_for(lambda evs: any("delta" in e["properties"] for e in evs if e["type"] == "message.part.updated"))
        started = time.monotonic()
        assert on_a.post(f"/api/sessions/{sid}/abort/", json={}).json() == {"aborted": True}
        done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=5)
        took = time.monotonic() - started
        assert done["properties"]["status"] == "cancelled"
        idle(stream)
    print(f"\nabort → cancelled ({mode} mode): {took * 1000:.0f} ms")
    assert took < 1.0  # the contract's bound, not a performance target
    deltas, final = streamed_text(stream, reply_id)
    assert deltas == final and words(300).startswith(final)


@pytest.mark.parametrize("mode", ["worker", "inline"])
def test_killed_runner_ends_the_reply_interrupted(
    mode: str, servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    env = {**FAST_LEASE, "TANDEM_ECHO_DELAY_MS": "30"}
    if mode == "worker":
        (watcher,) = servers(1, redis=True, workers=1, **env)
        poster = watcher
    else:
        poster, watcher = servers(2, redis=True, **env)  # the reply runs on the poster
    sid = shared_session.id
    stream = sse_streams(watcher.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(poster, bob) as client:
        reply_id = post(client, sid, words(400))
    # Let the reply stream for a while, so there is text to keep.
    stream.wait_for(lambda evs: len(streamed_text(stream, reply_id)[0]) > 40)
    victim = servers.workers[0] if mode == "worker" else poster
    victim.proc.kill()
    killed = time.monotonic()
    done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=60)
    took = time.monotonic() - killed
    lease = FAST_LEASE["TANDEM_RUN_LEASE_SECONDS"]
    print(f"\nkill -9 → interrupted ({mode} mode, {lease} s lease): {took:.1f} s")
    assert done["properties"]["status"] == "error"
    assert done["properties"]["error"]["code"] == "interrupted"
    idle(stream)
    deltas, final = streamed_text(stream, reply_id)
    # Every delta that went out was persisted first: the kept text is exactly what
    # clients saw, and a prefix of the reply.
    assert final == deltas and len(final) > 40 and words(400).startswith(final)
    with api_client(watcher, alice) as client:
        assert client.get(f"/api/sessions/{sid}/").json()["status"] == {"type": "idle"}
        reply = [m for m in client.get(f"/api/sessions/{sid}/messages/").json()["results"] if m["id"] == reply_id][0]
        assert reply["status"] == "error" and reply["error"]["code"] == "interrupted"
        # The session is usable again.
        post(client, sid, "after the crash")


def test_permission_survives_a_server_restart_and_is_answered_through_another(
    servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any, tmp_path: Any
) -> None:
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    server_a, server_b = servers(2, redis=True, workers=1)
    sid = shared_session.id
    stream = sse_streams(server_b.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    with api_client(server_a, bob) as client:
        reply_id = post(client, sid, "!calc 2*(3+4)")
    requested = stream.wait_for_type("permission.requested")["properties"]["permission"]
    server_a.stop()  # the server that took the message goes away
    (server_c,) = servers(1, redis=True, workers=0, TANDEM_AGENT_MODE="worker")
    with api_client(server_c, alice) as client:
        pending = client.get(f"/api/sessions/{sid}/permissions/", params={"status": "pending"}).json()
        assert [p["id"] for p in pending] == [requested["id"]]
        answered = client.post(f"/api/sessions/{sid}/permissions/{requested['id']}/", json={"approved": True})
        assert answered.status_code == 200, answered.text
    done = stream.wait_for_type("message.completed", message_id=reply_id, timeout=10)
    assert done["properties"]["status"] == "completed"
    assert streamed_text(stream, reply_id)[1] == "2*(3+4) = 14"


def test_answers_through_two_processes_at_once_exactly_one_wins(
    servers: Any, shared_session: Session, alice: Any, bob: Any, sse_streams: Any
) -> None:
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    server_a, server_b = servers(2, redis=True, workers=1)
    sid = shared_session.id
    stream = sse_streams(server_a.url, f"/api/sessions/{sid}/stream/", token=token_for(alice))
    stream.wait_for_type("server.connected")
    seen: set[str] = set()
    for round_ in range(3):
        with api_client(server_a, bob) as client:
            reply_id = post(client, sid, f"!calc {round_}+1")
        pid = stream.wait_for(
            lambda evs: next(
                (
                    e["properties"]["permission"]["id"] for e in evs
                    if e["type"] == "permission.requested" and e["properties"]["permission"]["id"] not in seen
                ),
                None,
            ),
            timeout=10,
        )
        seen.add(pid)
        barrier = threading.Barrier(2)
        codes: list[int] = []

        def respond(server: Any, user: Any, approved: bool) -> None:
            with api_client(server, user) as client:
                barrier.wait(timeout=10)
                codes.append(client.post(f"/api/sessions/{sid}/permissions/{pid}/", json={"approved": approved}).status_code)

        threads = [
            threading.Thread(target=respond, args=(server_a, alice, True)),
            threading.Thread(target=respond, args=(server_b, bob, False)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(codes) == [200, 409], codes
        with api_client(server_b, alice) as client:
            def resolved_once() -> bool:
                types = {"types": "permission.resolved,message.completed"}
                events = client.get(f"/api/sessions/{sid}/events/", params=types).json()["events"]
                mine = [e for e in events if e["properties"].get("permission_id") == pid]
                done = any(e["properties"].get("message_id") == reply_id for e in events)
                return done and len(mine) == 1

            wait_for(resolved_once, timeout=10)
            wait_for(lambda: client.get(f"/api/sessions/{sid}/").json()["status"] == {"type": "idle"}, timeout=10)
