"""The chaos test: two server processes, an agents worker, PostgreSQL or SQLite, and
a Redis of the test's own; SSE and WebSocket clients on both processes across several
sessions, with replies streaming and custom events published all the time. One server
process is killed with SIGKILL and restarted, again and again; Redis is stopped and
started once, and hung (SIGSTOP, then SIGCONT) once, for a few seconds each while
messages are being posted. At the end every client must have seen every session's seqs
exactly 1..N, in order, each envelope equal to the log's; every message's final text
must equal the concatenation of its deltas; and every reply, those posted during the
Redis outages included, must have completed with the full text.

``TANDEM_CHAOS_SECONDS`` sets how long the chaos lasts (default 30); ``python -m
bench.chaos`` runs it for longer.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import token_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.chaos]

CHAOS_SECONDS = float(os.environ.get("TANDEM_CHAOS_SECONDS", "30"))
SERVER_ENV = {
    "TANDEM_AGENT_MODE": "worker",
    "TANDEM_ECHO_DELAY_MS": "10",
    "TANDEM_HEARTBEAT_SECONDS": "2",  # also how often a hub checks heads after a Redis outage
    "TANDEM_RUN_LEASE_SECONDS": "3",
    "TANDEM_PRESENCE_TTL_SECONDS": "5",
    "TANDEM_MAX_CONNECTIONS_PER_USER": "1000",
}
# How long each Redis outage (stopped, then hung) lasts: longer than a run lease, so a
# reply whose runner gave up on Redis would be reaped `interrupted`.
OUTAGE_SECONDS = 4.0


class Cluster:
    """The live server processes; a killed one is replaced by a new one (new port)."""

    def __init__(self, start: Any, count: int, redis_url: str) -> None:
        self._start = start
        self._env = {**SERVER_ENV, "REDIS_URL": redis_url}
        self._lock = threading.Lock()
        self.servers = start(count, redis=True, workers=1, **self._env)

    def urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self.servers if s.proc.poll() is None]

    def any_url(self) -> str:
        urls = self.urls()
        return random.choice(urls) if urls else ""

    def kill_one(self) -> None:
        with self._lock:
            victim = random.choice(self.servers)
            victim.proc.kill()
            victim.proc.wait()
            self.servers.remove(victim)
        (replacement,) = self._start(1, redis=True, **self._env)
        with self._lock:
            self.servers.append(replacement)


@dataclass
class Reader:
    """One client of one session that reconnects forever and remembers every persisted
    envelope it was given, in order."""

    kind: str  # "sse" | "ws"
    session_id: str
    token: str
    cluster: Cluster
    stop: threading.Event
    seen: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0

    @property
    def last(self) -> int:
        return self.seen[-1]["seq"] if self.seen else 0

    def take(self, envelope: dict[str, Any]) -> None:
        if envelope.get("seq") is not None and envelope.get("session_id") == self.session_id:
            self.seen.append(envelope)

    def run(self) -> None:
        while not self.stop.is_set():
            url = self.cluster.any_url()
            try:
                if url:
                    self._sse(url) if self.kind == "sse" else self._ws(url)
            except Exception:  # the server died under us: reconnect, as a client would
                pass
            self.reconnects += 1
            time.sleep(0.1)

    def _sse(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Last-Event-ID": str(self.last)}
        timeout = httpx.Timeout(5.0, read=6.0)
        with httpx.stream("GET", f"{url}/api/sessions/{self.session_id}/stream/", headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                return
            for line in response.iter_lines():
                if self.stop.is_set():
                    return
                if line.startswith("data: "):
                    self.take(json.loads(line[6:]))

    def _ws(self, url: str) -> None:
        target = url.replace("http://", "ws://") + f"/ws/sessions/{self.session_id}/?token={self.token}&last_event_id={self.last}"
        with ws_connect(target, open_timeout=5, close_timeout=1) as socket:
            while not self.stop.is_set():
                try:
                    text = socket.recv(timeout=6)
                except TimeoutError:
                    return  # heartbeats come every 2 s: silence means a dead server
                self.take(json.loads(text))


@dataclass
class Outage:
    """Whether Redis is away now, and the replies posted meanwhile."""

    now: threading.Event = field(default_factory=threading.Event)
    replies: list[tuple[str, str]] = field(default_factory=list)  # (session id, reply id)


def _load(
    kind: str, session_id: str, token: str, cluster: Cluster, stop: threading.Event,
    counts: dict[str, int], outage: Outage,
) -> None:
    """Publish custom events, or post echo messages, for as long as the chaos lasts."""
    headers = {"Authorization": f"Bearer {token}"}
    i = 0
    while not stop.is_set():
        url = cluster.any_url()
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=5) as client:
                while not stop.is_set():
                    if kind == "events":
                        response = client.post(f"/api/sessions/{session_id}/events/", json={"type": "chaos.tick", "properties": {"i": i}})
                        time.sleep(0.05)
                    else:
                        words = " ".join(f"w{i}x{n}" for n in range(30))
                        # reject: one reply at a time, each right after its prompt in the
                        # log (the queue's order through kills has tests of its own).
                        body = {"parts": [{"type": "text", "text": words}], "if_busy": "reject"}
                        response = client.post(f"/api/sessions/{session_id}/messages/", json=body)
                        time.sleep(0.3)
                    if response.status_code in (201, 202):
                        counts[kind] = counts.get(kind, 0) + 1
                        if kind == "messages" and outage.now.is_set():
                            outage.replies.append((session_id, response.json()["reply_id"]))
                    i += 1
        except Exception:  # the server died: go to another
            time.sleep(0.1)


def _redis_outage(redis: Any, how: str, outage: Outage) -> float:
    """Stop and start, or hang (SIGSTOP) and resume, the test's Redis; returns how long
    it was away."""
    started = time.monotonic()
    outage.now.set()
    if how == "stop":
        redis.stop()
    else:
        redis.pause()
    time.sleep(OUTAGE_SECONDS)
    if how == "stop":
        redis.start()
    else:
        redis.resume()
    outage.now.clear()
    return time.monotonic() - started


def _log(url: str, token: str, session_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        while True:
            page = client.get(f"/api/sessions/{session_id}/events/", params={"after": len(events), "limit": 1000}).json()
            assert page["reset"] is False
            if not page["events"]:
                return events
            events += page["events"]


def _check_texts(log: list[dict[str, Any]]) -> int:
    """Every closed text part's full text equals its deltas, and every reply completed
    with the text it was asked to echo; returns how many replies."""
    deltas: dict[str, str] = {}
    finals: dict[str, str] = {}
    prompts: dict[str, str] = {}  # reply id -> the user's text before it
    replies: dict[str, str] = {}  # reply id -> its deltas, all parts
    last_prompt = ""
    completed: dict[str, str] = {}
    for event in log:
        props = event["properties"]
        if event["type"] == "message.created":
            message = props["message"]
            if message["role"] == "user":
                last_prompt = "".join(p["text"] for p in message["parts"])
            else:
                prompts[message["id"]] = last_prompt
        elif event["type"] == "message.part.updated" and props["part"]["type"] == "text":
            if "delta" in props:
                deltas[props["part"]["id"]] = deltas.get(props["part"]["id"], "") + props["delta"]
                replies[props["message_id"]] = replies.get(props["message_id"], "") + props["delta"]
            elif "text" in props["part"]:
                finals[props["part"]["id"]] = props["part"]["text"]
        elif event["type"] == "message.completed":
            completed[props["message_id"]] = props["status"]
    for part_id, text in finals.items():
        assert deltas.get(part_id, "") == text, part_id
    assert set(completed) == set(prompts), "a reply never ended"
    for reply_id, prompt in prompts.items():
        assert (completed[reply_id], replies.get(reply_id, "")) == ("completed", prompt), reply_id
    return len(completed)


def test_nothing_is_lost_duplicated_or_reordered_through_kills_and_redis_outages(
    servers: Any, private_redis: Any, alice: Any, bob: Any
) -> None:
    cluster = Cluster(servers, 2, private_redis.url)
    token = token_for(alice)
    with httpx.Client(base_url=cluster.any_url(), headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        session_ids = [client.post("/api/sessions/", json={"title": f"chaos {n}"}).json()["id"] for n in range(3)]
    stop_readers, stop_load = threading.Event(), threading.Event()
    readers = [
        Reader(kind, sid, token, cluster, stop_readers)
        for sid in session_ids for kind in ("sse", "ws", "sse", "ws")
    ]
    counts: dict[str, int] = {}
    outage = Outage()
    threads = [threading.Thread(target=r.run, daemon=True) for r in readers]
    threads += [
        threading.Thread(target=_load, args=(kind, sid, token, cluster, stop_load, counts, outage), daemon=True)
        for sid in session_ids for kind in ("events", "messages")
    ]
    for thread in threads:
        thread.start()

    kills = 0
    away: dict[str, float] = {}  # "stop" / "hang" -> seconds Redis was away
    started = time.monotonic()
    while time.monotonic() - started < CHAOS_SECONDS or len(away) < 2:
        time.sleep(3)
        elapsed = time.monotonic() - started
        if "stop" not in away and elapsed > CHAOS_SECONDS / 3:
            away["stop"] = _redis_outage(private_redis, "stop", outage)
        elif "hang" not in away and elapsed > 2 * CHAOS_SECONDS / 3:
            away["hang"] = _redis_outage(private_redis, "hang", outage)
        else:
            cluster.kill_one()
            kills += 1
    stop_load.set()

    # Let every reply finish or be reaped, then every reader catch up with the log.
    url = cluster.any_url()
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        while time.monotonic() < deadline:
            statuses = [client.get(f"/api/sessions/{sid}/").json()["status"]["type"] for sid in session_ids]
            if all(s == "idle" for s in statuses):
                break
            time.sleep(0.2)
        heads = {sid: client.get(f"/api/sessions/{sid}/").json()["last_seq"] for sid in session_ids}
    while time.monotonic() < deadline and any(r.last < heads[r.session_id] for r in readers):
        time.sleep(0.2)
    stop_readers.set()

    logs = {sid: _log(url, token, sid) for sid in session_ids}
    checked = 0
    for reader in readers:
        log = logs[reader.session_id]
        seqs = [e["seq"] for e in reader.seen]
        assert seqs == list(range(1, len(log) + 1)), (reader.kind, reader.session_id, _first_problem(seqs))
        assert reader.seen == log, (reader.kind, reader.session_id)  # byte for byte the log's envelopes
        checked += len(seqs)
    messages = sum(_check_texts(log) for log in logs.values())
    # _check_texts saw every reply complete in full; these are the ones posted while
    # Redis was away.
    figures = {
        "seconds": round(time.monotonic() - started, 1), "server_kills": kills,
        "redis_stopped_s": round(away["stop"], 2), "redis_hung_s": round(away["hang"], 2),
        "replies_posted_during_outages": len(outage.replies),
        "sessions": len(session_ids), "clients": len(readers),
        "events_per_session": {sid: len(log) for sid, log in logs.items()},
        "deliveries_checked": checked, "messages_checked": messages,
        "custom_events_posted": counts.get("events", 0), "messages_posted": counts.get("messages", 0),
        "reconnects": sum(r.reconnects for r in readers), "losses": 0, "duplicates": 0, "reordered": 0,
    }
    print("\nchaos:", json.dumps(figures))
    assert kills >= 1 and set(away) == {"stop", "hang"}
    assert outage.replies, "no message was posted while Redis was away"


def _first_problem(seqs: list[int]) -> str:
    for i, seq in enumerate(seqs, start=1):
        if seq != i:
            return f"position {i}: got {seq} (around {seqs[max(0, i - 4):i + 3]})"
    return f"{len(seqs)} seqs, log longer"
