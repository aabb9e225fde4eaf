"""The chaos test: two server processes, an agents worker, PostgreSQL or SQLite, and
Redis; SSE and WebSocket clients on both processes across several sessions, with replies
streaming and custom events published all the time. One server process is killed with
SIGKILL and restarted, again and again, and Redis is restarted once. At the end every
client must have seen every session's seqs exactly 1..N, in order, each envelope equal
to the log's, and every message's final text must equal the concatenation of its deltas.

``TANDEM_CHAOS_SECONDS`` sets how long the chaos lasts (default 30); ``python -m
bench.chaos`` runs it for longer.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import REDIS_URL, token_for

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
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]


class Cluster:
    """The live server processes; a killed one is replaced by a new one (new port)."""

    def __init__(self, start: Any, count: int) -> None:
        self._start = start
        self._lock = threading.Lock()
        self.servers = start(count, redis=True, workers=1, **SERVER_ENV)

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
        (replacement,) = self._start(1, redis=True, **SERVER_ENV)
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


def _load(kind: str, session_id: str, token: str, cluster: Cluster, stop: threading.Event, counts: dict[str, int]) -> None:
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
                        response = client.post(f"/api/sessions/{session_id}/messages/", json={"parts": [{"type": "text", "text": words}]})
                        time.sleep(0.3)
                    if response.status_code in (201, 202):
                        counts[kind] = counts.get(kind, 0) + 1
                    i += 1
        except Exception:  # the server died: go to another
            time.sleep(0.1)


def _restart_redis() -> float:
    started = time.monotonic()
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=10)
    time.sleep(0.5)
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    subprocess.run(REDIS_START, check=True, capture_output=True, timeout=10)
    import redis

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping():
                return time.monotonic() - started
        except Exception:
            time.sleep(0.1)
    raise AssertionError("Redis did not come back")


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
    """Every closed text part's full text equals its deltas; returns how many messages."""
    deltas: dict[str, str] = {}
    finals: dict[str, str] = {}
    completed = 0
    for event in log:
        props = event["properties"]
        if event["type"] == "message.part.updated" and props["part"]["type"] == "text":
            if "delta" in props:
                deltas[props["part"]["id"]] = deltas.get(props["part"]["id"], "") + props["delta"]
            elif "text" in props["part"]:
                finals[props["part"]["id"]] = props["part"]["text"]
        elif event["type"] == "message.completed":
            completed += 1
    for part_id, text in finals.items():
        assert deltas.get(part_id, "") == text, part_id
    return completed


def test_nothing_is_lost_duplicated_or_reordered_through_kills_and_a_redis_restart(
    servers: Any, alice: Any, bob: Any
) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is required to restart Redis in the chaos test")
    cluster = Cluster(servers, 2)
    token = token_for(alice)
    with httpx.Client(base_url=cluster.any_url(), headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        session_ids = [client.post("/api/sessions/", json={"title": f"chaos {n}"}).json()["id"] for n in range(3)]
    stop_readers, stop_load = threading.Event(), threading.Event()
    readers = [
        Reader(kind, sid, token, cluster, stop_readers)
        for sid in session_ids for kind in ("sse", "ws", "sse", "ws")
    ]
    counts: dict[str, int] = {}
    threads = [threading.Thread(target=r.run, daemon=True) for r in readers]
    threads += [
        threading.Thread(target=_load, args=(kind, sid, token, cluster, stop_load, counts), daemon=True)
        for sid in session_ids for kind in ("events", "messages")
    ]
    for thread in threads:
        thread.start()

    kills, redis_restarts, redis_took = 0, 0, 0.0
    started = time.monotonic()
    while time.monotonic() - started < CHAOS_SECONDS:
        time.sleep(3)
        if redis_restarts == 0 and time.monotonic() - started > CHAOS_SECONDS / 2:
            redis_took = _restart_redis()
            redis_restarts += 1
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
    figures = {
        "seconds": round(time.monotonic() - started, 1), "server_kills": kills, "redis_restarts": redis_restarts,
        "redis_down_s": round(redis_took, 2), "sessions": len(session_ids), "clients": len(readers),
        "events_per_session": {sid: len(log) for sid, log in logs.items()},
        "deliveries_checked": checked, "messages_checked": messages,
        "custom_events_posted": counts.get("events", 0), "messages_posted": counts.get("messages", 0),
        "reconnects": sum(r.reconnects for r in readers), "losses": 0, "duplicates": 0, "reordered": 0,
    }
    print("\nchaos:", json.dumps(figures))
    assert kills >= 1 and redis_restarts == 1


def _first_problem(seqs: list[int]) -> str:
    for i, seq in enumerate(seqs, start=1):
        if seq != i:
            return f"position {i}: got {seq} (around {seqs[max(0, i - 4):i + 3]})"
    return f"{len(seqs)} seqs, log longer"
