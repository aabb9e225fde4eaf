"""The user-level stream's cursor stays small (at most 256 bytes) however many sessions
the user has, and resuming from any cursor it handed out is exact: per session, no loss,
no duplicate, no reorder — with events of many sessions committed concurrently by the
server (on PostgreSQL, a smaller primary key can commit after a larger one), over a real
socket and through the npm ``eventsource`` client's own reconnect."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from django.db import transaction

from events_app.models import CursorSnapshot
from events_app.services import publish
from sessions_app.models import Membership, Role, Session
from tests.conftest import start_server, token_for
from tests.nodeclients import NODE_DIR
from tests.test_sse_real_socket import SSEClient

CURSOR_MAX = 256
N_SESSIONS = 1000


def many_sessions(user: Any, n: int = N_SESSIONS) -> list[str]:
    """``n`` sessions owned by ``user``, in two bulk inserts."""
    sessions = Session.objects.bulk_create(
        [Session(owner=user, title=f"s{i}", agent="echo") for i in range(n)], batch_size=500
    )
    Membership.objects.bulk_create(
        [Membership(session=s, user=user, role=Role.OWNER) for s in sessions], batch_size=500
    )
    return [s.id for s in sessions]


def post_events(server: Any, user: Any, targets: list[str], workers: int = 8) -> None:
    """One custom event per target session, posted concurrently: the server commits
    them in whatever order its threads get there."""
    headers = {"Authorization": f"Bearer {token_for(user)}"}

    def post(chunk: list[tuple[int, str]]) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for i, sid in chunk:
                response = client.post(
                    f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}}
                )
                assert response.status_code == 201, response.text

    items = list(enumerate(targets))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(post, [items[k::workers] for k in range(workers)]))


def heads(session_ids: list[str]) -> dict[str, int]:
    return dict(Session.objects.filter(pk__in=session_ids, last_seq__gt=0).values_list("id", "last_seq"))


def assert_exact(received: list[tuple[str, int]], expected_heads: dict[str, int], after: dict[str, int] | None = None) -> None:
    """Per session, the seqs received are exactly after+1 .. head, in order."""
    got: dict[str, list[int]] = defaultdict(list)
    for sid, seq in received:
        got[sid].append(seq)
    after = after or {}
    for sid, head in expected_heads.items():
        start = after.get(sid, 0)
        assert got.get(sid, []) == list(range(start + 1, head + 1)), (sid, got.get(sid), start, head)
    assert set(got) <= set(expected_heads), set(got) - set(expected_heads)


def test_cursor_stays_small_and_resumes_exactly_from_any_cursor_with_1000_sessions(
    servers: Any, alice: Any
) -> None:
    session_ids = many_sessions(alice)
    (server,) = servers(1)
    token = token_for(alice)
    stream = SSEClient(server.url, "/api/stream/", token=token)
    try:
        hello = stream.wait_for_type("server.connected")
        assert len(hello["properties"]["cursor"]) <= CURSOR_MAX
        # 600 events over 400 of the sessions, committed by 8 concurrent writers, then a
        # second round over the same sessions in another order.
        targets = session_ids[:400] + session_ids[:400:2]
        post_events(server, alice, targets)
        post_events(server, alice, list(reversed(targets[:200])))
        total = len(targets) + 200
        stream.wait_for(lambda events: sum(e["seq"] is not None for e in events) >= total, timeout=60)
        frames = [f for f in stream.frames if f["data"] is not None and f["data"]["seq"] is not None]
    finally:
        stream.close()
    assert len(frames) == total
    final_heads = heads(session_ids)
    assert_exact([(f["data"]["session_id"], f["data"]["seq"]) for f in frames], final_heads)
    for frame in frames:
        assert frame["id"] == frame["data"]["cursor"]
        assert len(frame["id"].encode()) <= CURSOR_MAX, frame["id"]
    assert CursorSnapshot.objects.filter(user_id=alice.pk).count() > 1  # it did take new ones

    # Resume from cursors spread over the stream: each gets exactly what followed it.
    marker_sid = session_ids[-1]
    for k in [0, 1, 57, 233, 512, total - 2, total - 1]:
        cursor = frames[k]["id"]
        before = [(f["data"]["session_id"], f["data"]["seq"]) for f in frames[: k + 1]]
        positions: dict[str, int] = {}
        for sid, seq in before:
            positions[sid] = seq
        resumed = SSEClient(server.url, "/api/stream/", token=token, headers={"Last-Event-ID": cursor})
        try:
            hello = resumed.wait_for_type("server.connected")
            assert hello["properties"]["resumed"] is True
            post_events(server, alice, [marker_sid], workers=1)
            marker = heads([marker_sid])[marker_sid]
            resumed.wait_for(
                lambda events: any(e["session_id"] == marker_sid and e["seq"] == marker for e in events),
                timeout=30,
            )
            got = [(e["session_id"], e["seq"]) for e in resumed.persisted()]
        finally:
            resumed.close()
        assert "stream.reset" not in [e["type"] for e in resumed.events]
        expected = heads(session_ids)
        assert_exact(got, expected, positions)
        assert all(len(e["cursor"]) <= CURSOR_MAX for e in resumed.persisted())


NODE_SCRIPT = r"""
import { EventSource } from "eventsource";
const [url] = process.argv.slice(-1);
const source = new EventSource(url);
let opens = 0;
source.onopen = () => { opens += 1; console.log(JSON.stringify({open: opens})); };
source.onmessage = (message) => {
  const event = JSON.parse(message.data);
  console.log(JSON.stringify({id: message.lastEventId, event}));
};
"""


def test_npm_eventsource_resumes_the_user_stream_exactly_after_the_server_restarts(
    servers: Any, alice: Any, tmp_path: Any
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("Node and tests/node/node_modules are required (scripts/test.sh installs them)")
    session_ids = many_sessions(alice)
    (server,) = servers(1)
    url = f"{server.url}/api/stream/?token={token_for(alice)}"
    proc = subprocess.Popen(
        [node, "--input-type=module", "-e", NODE_SCRIPT, "--", url],
        cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[dict[str, Any]] = []
    cond = threading.Condition()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with cond:
                lines.append(json.loads(line))
                cond.notify_all()

    def wait(predicate: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
                    raise AssertionError(f"not within {timeout}s (node exit {proc.poll()}): {lines[-5:]} {stderr}")
                cond.wait(min(left, 0.5))

    def persisted() -> list[dict[str, Any]]:
        return [line for line in lines if "event" in line and line["event"]["seq"] is not None]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    restarted = None
    try:
        wait(lambda: any("event" in ln and ln["event"]["type"] == "server.connected" for ln in lines))
        post_events(server, alice, session_ids[:300])
        wait(lambda: len(persisted()) >= 300)
        server.proc.kill()  # a crash: the client is cut off mid-stream
        server.proc.wait()
        # Committed while the client is away, in 150 sessions (50 it has never heard of).
        for sid in session_ids[100:250]:
            with transaction.atomic():
                publish(sid, "task.progress", {"away": True})
        restarted = start_server({"TANDEM_AGENT_MODE": "inline"}, tmp_path, name="restarted", port=server.port)
        wait(lambda: sum(1 for ln in lines if "open" in ln) >= 2)  # eventsource's own reconnect
        post_events(restarted, alice, session_ids[200:260])
        # A resumed user-level stream replays session by session (each in seq order), so
        # no one event marks the end: wait for as many as the log holds, then a moment
        # more for any that should not come.
        total = sum(heads(session_ids).values())
        wait(lambda: len(persisted()) >= total)
        time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        if restarted is not None:
            restarted.stop()
    with cond:
        events = persisted()
    connected = [ln["event"] for ln in lines if "event" in ln and ln["event"]["type"] == "server.connected"]
    assert len(connected) == 2 and connected[1]["properties"]["resumed"] is True
    assert not [ln for ln in lines if "event" in ln and ln["event"]["type"] == "stream.reset"]
    assert_exact([(e["event"]["session_id"], e["event"]["seq"]) for e in events], heads(session_ids))
    for line in events:
        assert line["id"] == line["event"]["cursor"] and len(line["id"].encode()) <= CURSOR_MAX


def test_a_cursor_whose_snapshot_is_gone_or_another_users_resets_every_session(
    servers: Any, alice: Any, bob: Any
) -> None:
    session_ids = many_sessions(alice, 3)
    many_sessions(bob, 2)
    (server,) = servers(1)
    stream = SSEClient(server.url, "/api/stream/", token=token_for(alice))
    try:
        cursor = stream.wait_for_type("server.connected")["properties"]["cursor"]
    finally:
        stream.close()
    # bob presents alice's cursor: it names nothing of his.
    as_bob = SSEClient(server.url, "/api/stream/", token=token_for(bob), headers={"Last-Event-ID": cursor})
    try:
        as_bob.wait_for(lambda events: sum(e["type"] == "stream.reset" for e in events) >= 2)
    finally:
        as_bob.close()
    assert {e["properties"]["reason"] for e in as_bob.events if e["type"] == "stream.reset"} == {"unknown_position"}
    CursorSnapshot.objects.all().delete()  # as retention does
    again = SSEClient(server.url, "/api/stream/", token=token_for(alice), headers={"Last-Event-ID": cursor})
    try:
        again.wait_for(lambda events: sum(e["type"] == "stream.reset" for e in events) >= 3)
        hello = again.wait_for_type("server.connected")
    finally:
        again.close()
    assert hello["properties"]["resumed"] is False
    assert {e["session_id"] for e in again.events if e["type"] == "stream.reset"} == set(session_ids)
    # Malformed cursors are still 400.
    for bad in ["s" + "A" * 15, "sAAAAAAAAAAAAAAAA.zz-1", "x" * 300, "sAAAAAAAAAAAAAAAA" + ".1-1" * 70]:
        response = httpx.get(f"{server.url}/api/stream/", headers={"Authorization": f"Bearer {token_for(alice)}", "Last-Event-ID": bad})
        assert response.status_code == 400, (bad, response.text)


@pytest.mark.django_db
def test_cursor_snapshots_are_pruned_with_the_events(alice: Any, settings: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from events_app.services import prune_expired

    settings.TANDEM_EVENT_RETENTION_SECONDS = 3600
    now = timezone.now()
    CursorSnapshot.objects.create(id="o" * 16, user_id=alice.pk, positions="[]", created_at=now - timedelta(hours=2))
    CursorSnapshot.objects.create(id="n" * 16, user_id=alice.pk, positions="[]", created_at=now)
    prune_expired()
    assert list(CursorSnapshot.objects.values_list("id", flat=True)) == ["n" * 16]
