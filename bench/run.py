"""The load tool: ``python -m bench SCENARIO [options]`` (or ``python bench/run.py``).

Scenarios (each bounded in time and count, loopback only):

  fanout       N SSE/WebSocket clients over S sessions; custom events at one or more rates
  echo         S sessions x C clients (SSE and WebSocket mixed); an echo reply streams in each
  idle         N idle streams held open; heartbeats on time; RSS per connection
  first-delta  POST a message -> the first text delta at a subscriber, one at a time
  posts        POST messages as fast as the server takes them, every event checked
  churn        R rounds of N connects and disconnects; RSS and leak gauges after each
  storm        N clients open at once, no pacing: connected, failures, connect p50/p99, time
               until all connected, server and client CPU
  reconnect-storm  N open streams all drop at once (clients close, or --drop kill: the
               server is killed with SIGKILL and --restart-cmd starts it again) and come back
               with jittered backoff and their last seq: time until all resumed; lost,
               duplicated and reordered events across both connections
  doc          N editors (--clients) type --rate keystrokes a second each into one shared
               document over its WebSocket, spread over --url and --url2: update latency
               p50/p99, lost deliveries, convergence, the stored text, server CPU

``--target peer`` points fanout, idle, storm and reconnect-storm (SSE) at the seed-design
peer (``bench/peer.py``; it cannot resume, so there only the times are measured). Reports go to
stdout as a table and, with ``--json PATH``, as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import docbench
from bench.clients import StreamClient, connect_all
from bench.procinfo import Server, cpu_by_role
from bench.stats import by_bn, by_seq, connect_summary, count_reordered, percentiles, table
from bench.targets import BenchError, TandemTarget, Target, make_target, spread

Scenario = Callable[[argparse.Namespace, Target], Awaitable[dict[str, Any]]]


# ---------------------------------------------------------------- helpers


class ServerProbe:
    """RSS and CPU of the server processes, when they can be found from the port."""

    def __init__(self, port: int) -> None:
        self.server = Server(port)
        self.samples: dict[str, int] = {}
        self.cpu_start = self.server.cpu_seconds()

    def cpu(self) -> float:
        return self.server.cpu_seconds() if self.server.pids else 0.0

    def sample(self, name: str) -> None:
        if self.server.pids:
            self.samples[name] = self.server.rss_kb()

    def report(self, connections: int = 0, before: str = "before", after: str = "connected") -> dict[str, Any]:
        out: dict[str, Any] = {"pids": self.server.pids, "rss_kb": dict(self.samples)}
        if self.server.pids:
            out["cpu_seconds"] = round(self.server.cpu_seconds() - self.cpu_start, 2)
        if connections and before in self.samples and after in self.samples:
            out["kb_per_connection"] = round((self.samples[after] - self.samples[before]) / connections, 1)
        return out


def open_clients(args: argparse.Namespace, target: Target, transport: str, keep_time: bool = False) -> tuple[list[StreamClient], list[int]]:
    layout = spread(target.sessions, args.clients, transport)
    index = {s: i for i, s in enumerate(target.sessions)}
    clients = [StreamClient(target.endpoint(s, t, args.types or None), keep_time) for s, t in layout]
    return clients, [index[s] for s, _ in layout]


async def close_all(clients: list[StreamClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def wait_until(done: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        await asyncio.sleep(step)
    return done()


async def _set_up_streams(
    args: argparse.Namespace, target: Target
) -> tuple[ServerProbe, list[StreamClient], list[int], float]:
    """Sessions, then every client connected, with the server's RSS before and after."""
    if args.transport != "sse" and not target.supports_ws:
        raise BenchError("this target serves SSE only")
    await target.setup(args.sessions)
    probe = ServerProbe(target.port)
    probe.sample("before")
    clients, session_of = open_clients(args, target, args.transport)
    seconds = await connect_all(clients, args.connect_concurrency, args.timeout)
    await asyncio.sleep(args.settle)
    probe.sample("connected")
    return probe, clients, session_of, seconds


# ---------------------------------------------------------------- scenarios


async def fanout(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    probe, clients, session_of, seconds = await _set_up_streams(args, target)
    report: dict[str, Any] = {"clients": connect_summary(clients, seconds), "phases": []}
    live = [c for c in clients if c.connected_at and not c.error]
    if len(live) < len(clients) and not args.allow_failed:
        await close_all(clients)
        report["server"] = probe.report(len(live))
        report["error"] = "not every client connected"
        return report

    next_bn = 0
    gate = asyncio.Semaphore(args.publishers)
    for rate in args.rate:
        expected: dict[int, set[int]] = {i: set() for i in range(len(target.sessions))}
        sent: dict[int, float] = {}
        failures = 0
        tasks: list[asyncio.Task[None]] = []
        count = args.events if args.events else max(1, int(rate * args.duration))

        # B023: this rate's tasks are all gathered before the loop moves on to the next rate.
        async def publish(session_index: int, bn: int) -> None:
            nonlocal failures
            async with gate:
                sent[bn] = time.time()  # noqa: B023
                try:
                    await target.publish(target.sessions[session_index], bn)
                    expected[session_index].add(bn)  # noqa: B023
                except Exception:
                    failures += 1

        started = time.time()
        clock = time.monotonic()
        server_cpu, client_cpu = probe.server.cpu_seconds(), time.process_time()
        for k in range(count):
            for s in range(len(target.sessions)):
                tasks.append(asyncio.create_task(publish(s, next_bn)))
                next_bn += 1
            await asyncio.sleep(max(0.0, clock + (k + 1) / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        published_for = time.time() - started
        per_session = {i: len(v) for i, v in expected.items()}
        lowest = min(sent) if sent else 0
        scanned = [0] * len(clients)
        counts = [0] * len(clients)

        def complete() -> bool:
            # Incremental: a full rescan of every client each time would stall the loop
            # the clients read on, and show up as latency.
            done = True
            for i, c in enumerate(clients):
                if c.ended:
                    continue
                bns = c.bns
                n = len(bns)
                counts[i] += sum(1 for j in range(scanned[i], n) if bns[j] >= lowest)  # noqa: B023 (polled in this iteration)
                scanned[i] = n  # noqa: B023
                if counts[i] < per_session[session_of[i]]:  # noqa: B023
                    done = False
            return done

        await wait_until(complete, args.drain, step=0.25)
        server_cpu = probe.server.cpu_seconds() - server_cpu
        client_cpu = time.process_time() - client_cpu
        stats = by_bn(clients, expected, sent, session_of)
        last = stats.pop("last_delivery") or time.time()
        deliveries = stats["delivered"]
        phase = {
            "rate_per_session": rate,
            "published": sum(per_session.values()), "publish_failures": failures,
            "publish_seconds": round(published_for, 2),
            "expected_deliveries": sum(per_session[session_of[i]] for i in range(len(clients))),
            **stats,
            "deliveries_per_s": round(deliveries / max(1e-6, last - started), 1),
            "offered_per_s": round(rate * len(clients), 1),
            # Everything the server's processes spent in the phase (publishing requests
            # included) over what reached the clients: at saturation, the cost of a delivery.
            "server_cpu_seconds": round(server_cpu, 2),
            "server_us_per_delivery": round(server_cpu / deliveries * 1e6, 1) if deliveries and probe.server.pids else None,
            "client_cpu_seconds": round(client_cpu, 4),
        }
        report["phases"].append(phase)
        probe.sample(f"after_rate_{rate:g}")
    report["clients"]["dropped_during_run"] = sum(1 for c in live if c.ended)
    await close_all(clients)
    report["server"] = probe.report(len(live))
    return report


async def echo(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    if not isinstance(target, TandemTarget):
        raise BenchError("echo replies are Tandem's")
    await target.setup(args.sessions)
    probe = ServerProbe(target.port)
    probe.sample("before")
    args.clients = args.sessions * args.per_session
    args.types = ""  # every event of the reply
    clients, session_of = open_clients(args, target, args.transport, keep_time=True)
    seconds = await connect_all(clients, args.connect_concurrency, args.timeout)
    probe.sample("connected")
    text = " ".join(f"w{i}" for i in range(args.words))
    gate = asyncio.Semaphore(args.publishers)
    statuses: dict[int, int] = {}

    async def post(session: str) -> None:
        async with gate:
            code = await target.post_message(session, text)
            statuses[code] = statuses.get(code, 0) + 1

    started = time.time()
    await asyncio.gather(*(post(s) for s in target.sessions))
    posted_for = time.time() - started
    # Done when every session is idle again and its clients have read up to its head.
    heads = await _settled_heads(target, args.drain)
    await wait_until(
        lambda: all(c.ended or (c.seqs and max(c.seqs) >= heads[session_of[i]]) for i, c in enumerate(clients)),
        args.drain, step=0.25,
    )
    elapsed = time.time() - started
    stats = by_seq(clients, [heads[session_of[i]] for i in range(len(clients))])
    lag = _lag_buckets(await target.metrics())
    probe.sample("end")
    await close_all(clients)
    starts = {session_of[i]: c.head or 0 for i, c in enumerate(clients)}
    return {
        "clients": connect_summary(clients, seconds),
        "posts": {"sessions": len(target.sessions), "statuses": statuses, "seconds": round(posted_for, 2)},
        "events_persisted": sum(heads.values()) - sum(starts.values()),
        **stats,
        "deliveries_per_s": round(stats["delivered"] / max(1e-6, elapsed), 1),
        # The server's own histogram: from the commit (in the worker) to its hub passing
        # the event on, i.e. the part of the latency spent before the streams' writes.
        "server_commit_to_hub": lag,
        "server": probe.report(len(clients)),
    }


def _lag_buckets(metrics: dict[str, float]) -> dict[str, float]:
    """Share of events the server's hub passed on within each bound (cumulative)."""
    total = metrics.get("tandem_delivery_lag_seconds_count", 0.0)
    out: dict[str, float] = {"events": total}
    for bound in ("0.01", "0.05", "0.25", "1.0", "5.0"):
        count = metrics.get(f'tandem_delivery_lag_seconds_bucket{{le="{bound}"}}')
        if count is not None and total:
            out[f"within_{bound}s"] = round(count / total, 4)
    return out


async def _settled_heads(target: TandemTarget, timeout: float) -> dict[int, int]:
    gate = asyncio.Semaphore(16)
    deadline = time.monotonic() + timeout

    async def one(session: str) -> int:
        async with gate:
            status, head = await target.state(session)
            while status != "idle" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                status, head = await target.state(session)
            return head

    values = await asyncio.gather(*(one(s) for s in target.sessions))
    return dict(enumerate(values))


async def idle(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    probe, clients, _, seconds = await _set_up_streams(args, target)
    held_from = time.time()
    await asyncio.sleep(args.hold)
    probe.sample("held")
    live = [c for c in clients if c.connected_at and not c.error]
    held = [c for c in live if not c.ended]
    gaps = [c.heartbeat_gap for c in held if c.heartbeat_gap]
    silent = sum(1 for c in held if c.heartbeats == 0)
    report = {
        "clients": connect_summary(clients, seconds),
        "held_seconds": round(time.time() - held_from, 1),
        "still_open": len(held),
        "heartbeats": {
            "total": sum(c.heartbeats for c in held), "clients_without_any": silent,
            "longest_gap_ms": percentiles(gaps),
        },
        "server": probe.report(len(live), "before", "held"),
    }
    await close_all(clients)
    return report


async def first_delta(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    if not isinstance(target, TandemTarget):
        raise BenchError("message replies are Tandem's")
    await target.setup(1)
    session = target.sessions[0]
    client = StreamClient(target.endpoint(session, args.transport, None))
    await connect_all([client], 1, args.timeout)
    if client.error:
        raise BenchError(f"stream: {client.error}")
    first: asyncio.Future[float] | None = None
    idle_again = asyncio.Event()

    def on_frame(frame: bytes, now: float) -> None:
        if b'"message.part.updated"' in frame and b'"delta"' in frame and first is not None and not first.done():
            first.set_result(now)
        elif b'"session.status"' in frame and b'"idle"' in frame:
            idle_again.set()

    client.on_frame = on_frame
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    for _ in range(args.rounds):
        first = loop.create_future()
        idle_again.clear()
        t0 = time.time()
        code = await target.post_message(session, "hello")
        if code != 202:
            raise BenchError(f"post: HTTP {code}")
        latencies.append(await asyncio.wait_for(first, args.timeout) - t0)
        await asyncio.wait_for(idle_again.wait(), args.timeout)
    await client.close()
    _, head = await target.state(session)
    stats = by_seq([client], [head])
    return {"rounds": args.rounds, "post_to_first_delta_ms": percentiles(latencies),
            "delivered": stats["delivered"], "lost": stats["lost"], "duplicates": stats["duplicates"],
            "reordered": stats["reordered"]}


async def posts(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    if not isinstance(target, TandemTarget):
        raise BenchError("message posts are Tandem's")
    await target.setup(args.sessions)
    probe = ServerProbe(target.port)
    args.clients = args.sessions
    args.types = ""
    clients, session_of = open_clients(args, target, args.transport)
    seconds = await connect_all(clients, args.connect_concurrency, args.timeout)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    stop_at = time.monotonic() + args.duration
    sessions = target.sessions

    async def poster(k: int) -> None:
        mine = sessions[k::args.publishers]
        i = 0
        while mine and time.monotonic() < stop_at:
            t0 = time.perf_counter()
            code = await target.post_message(mine[i % len(mine)], "hi")
            latencies.append(time.perf_counter() - t0)
            statuses[code] = statuses.get(code, 0) + 1
            i += 1

    # The server's CPU while posting (the connects and the drain's state polls left
    # out), per accepted post: what bounds turns/s for one process.
    cpu_before = probe.cpu()
    roles_before = cpu_by_role(probe.server.pids)
    started = time.time()
    await asyncio.gather(*(poster(k) for k in range(args.publishers)))
    posting = time.time() - started
    turns_cpu = probe.cpu() - cpu_before
    roles_after = cpu_by_role(probe.server.pids)
    heads = await _settled_heads(target, args.drain)
    await wait_until(
        lambda: all(c.ended or (c.seqs and max(c.seqs) >= heads[session_of[i]]) for i, c in enumerate(clients)),
        args.drain, step=0.25,
    )
    stats = by_seq(clients, [heads[session_of[i]] for i in range(len(clients))])
    await close_all(clients)
    accepted = statuses.get(202, 0)
    persisted = sum(heads.values()) - sum({session_of[i]: c.head or 0 for i, c in enumerate(clients)}.values())
    return {
        "clients": connect_summary(clients, seconds),
        "seconds": round(posting, 2), "statuses": statuses,
        "accepted_per_s": round(accepted / posting, 1),
        "post_ms": percentiles(latencies),
        "events_persisted": persisted, "events_persisted_per_s": round(persisted / posting, 1),
        "server_cpu_ms_per_post": round(turns_cpu / accepted * 1e3, 2) if accepted and probe.server.pids else None,
        # Where each turn's CPU went while posting: every process of this machine by
        # role, and the machine as a whole (the kernel's share included).
        "cpu_ms_per_turn": {
            role: round((roles_after[role] - roles_before.get(role, 0.0)) / accepted * 1e3, 2)
            for role in roles_after
        } if accepted else None,
        "machine_cores_busy": round((roles_after["machine"] - roles_before["machine"]) / posting, 2),
        **{k: v for k, v in stats.items() if k != "latency_ms"},
        "server": probe.report(),
    }


async def churn(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    await target.setup(args.sessions)
    probe = ServerProbe(target.port)
    gauges_before = await target.metrics() if isinstance(target, TandemTarget) else {}
    probe.sample("start")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        clients, _ = open_clients(args, target, args.transport)
        seconds = await connect_all(clients, args.connect_concurrency, args.timeout)
        connected = sum(1 for c in clients if c.connected_at and not c.error)
        probe.sample(f"round_{r + 1}_open")
        await close_all(clients)
        await asyncio.sleep(args.settle)
        probe.sample(f"round_{r + 1}_closed")
        row: dict[str, Any] = {"connected": connected, "connect_s": round(seconds, 2),
                               "rss_kb_closed": probe.samples.get(f"round_{r + 1}_closed")}
        rounds.append(row)
    gauges_after: dict[str, float] = {}
    settled_after = None
    if isinstance(target, TandemTarget):
        # Closing sockets finish their close handshakes for a while after the clients
        # leave (WebSocket close timeouts): a leak is what is still there once that is
        # over, so poll until the task count is back, or --drain runs out.
        waited = time.monotonic()
        while True:
            gauges_after = await target.metrics()
            tasks, base = gauges_after.get("tandem_asyncio_tasks"), gauges_before.get("tandem_asyncio_tasks")
            if tasks is None or base is None or tasks <= base + 5 or time.monotonic() - waited > args.drain:
                break
            await asyncio.sleep(1)
        settled_after = round(time.monotonic() - waited, 1)
    start = probe.samples.get("start")
    end = probe.samples.get(f"round_{args.rounds}_closed")
    leak_keys = [k for k in gauges_after if k.startswith(("tandem_open_streams", "tandem_hub_", "tandem_asyncio_tasks"))]
    return {
        "rounds": rounds,
        "rss_kb": {"start": start, "end": end,
                   "change_pct": round((end - start) / start * 100, 1) if start and end else None},
        "gauges": {k: {"before": gauges_before.get(k), "after": gauges_after[k]} for k in sorted(leak_keys)},
        "gauges_read_after_s": settled_after,
        "server": probe.report(),
    }


def _open_summary(clients: list[StreamClient], seconds: float, started: float) -> dict[str, Any]:
    """Connected, failures, connect percentiles and the time until the last one was in."""
    out = connect_summary(clients, seconds)
    ok = [c for c in clients if c.connected_at and not c.error]
    # Until the response head (SSE headers, WebSocket 101): what the peer's connect time
    # is, since it sends nothing else before the first event.
    out["headers_ms"] = percentiles([c.headers_at - c.started_at for c in ok if c.headers_at])
    out["all_connected_s"] = (
        round(max(c.started_at + c.connect_seconds for c in ok) - started, 2) if len(ok) == len(clients) else None
    )
    return out


async def storm(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Every client opens at once, no pacing: how long until all are in, and at what cost."""
    if args.transport != "sse" and not target.supports_ws:
        raise BenchError("this target serves SSE only")
    await target.setup(args.sessions)
    probe = ServerProbe(target.port)
    probe.sample("before")
    clients, _ = open_clients(args, target, args.transport)
    client_cpu = time.process_time()
    started = time.perf_counter()
    seconds = await connect_all(clients, len(clients), args.timeout)
    client_cpu = time.process_time() - client_cpu
    probe.sample("connected")
    report = {
        "clients": _open_summary(clients, seconds, started),
        "client_cpu_seconds": round(client_cpu, 2),
        "server": probe.report(sum(1 for c in clients if c.connected_at and not c.error)),
    }
    await close_all(clients)
    return report


class _Publisher:
    """Publishes ``rate`` events per second to every session until stopped, remembering
    the seq of each accepted event; requests that fail (the server is down) are counted
    and not retried: whether such an event was committed is unknown, so it is neither
    owed nor counted as a duplicate."""

    def __init__(self, target: Target, rate: float) -> None:
        self.target, self.rate = target, rate
        self.seqs: dict[int, list[int]] = {i: [] for i in range(len(target.sessions))}
        self.failures = 0
        self.accepted = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        bn = 0
        clock = time.monotonic()
        k = 0
        while not self._stop.is_set():
            async def one(index: int, n: int) -> None:
                try:
                    seq = await self.target.publish(self.target.sessions[index], n)
                    self.accepted += 1
                    if seq is not None:
                        self.seqs[index].append(seq)
                except Exception:
                    self.failures += 1

            await asyncio.gather(*(one(i, bn + i) for i in range(len(self.target.sessions))))
            bn += len(self.target.sessions)
            k += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, clock + k / self.rate - time.monotonic()))

    async def stop(self) -> None:
        self._stop.set()
        await self._task


def _kill_server(port: int) -> list[int]:
    pids = Server(port).pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


async def reconnect_storm(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """N streams open with events flowing; then every one drops at once — the clients
    close their sockets (``--drop clients``: a deploy, a proxy restart) or the server is
    killed with SIGKILL and started again by ``--restart-cmd`` (``--drop kill``) — and
    every client comes back after a jittered backoff (as tandem_client does: half the
    delay fixed, half random, doubling per failed attempt), resuming after the last seq it
    read. Reports the time until all resumed and, for Tandem, every client's events
    across both connections: lost, duplicated, reordered (which must all be 0)."""
    if args.drop == "kill" and not args.restart_cmd:
        raise BenchError("--drop kill needs --restart-cmd (how to start the server again)")
    if args.transport != "sse" and not target.supports_ws:
        raise BenchError("this target serves SSE only")
    await target.setup(args.sessions)
    clients, session_of = open_clients(args, target, args.transport)
    seconds = await connect_all(clients, args.connect_concurrency, args.timeout)
    if any(c.error or not c.connected_at for c in clients):
        await close_all(clients)
        return {"clients": connect_summary(clients, seconds), "error": "not every client connected"}
    first_heads = [c.head for c in clients]
    publisher = _Publisher(target, args.rate[0])
    await asyncio.sleep(args.settle)
    history: list[list[StreamClient]] = [[c] for c in clients]
    restarted: asyncio.subprocess.Process | None = None
    killed: list[int] = []
    client_cpu = time.process_time()
    dropped_at = time.perf_counter()
    if args.drop == "kill":
        killed = _kill_server(target.port)
        restarted = await asyncio.create_subprocess_exec(
            *shlex.split(args.restart_cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        await wait_until(lambda: all(c.ended for c in clients), 10)
    await close_all(clients)
    attempts = [0] * len(clients)
    resumed_at: list[float | None] = [None] * len(clients)

    def last_read(i: int) -> int:
        seqs = [s for conn in history[i] for s in conn.seqs if s >= 0]
        return max([*seqs, first_heads[i] or 0])

    async def come_back(i: int) -> None:
        deadline = time.perf_counter() + args.timeout
        failures = 0
        while time.perf_counter() < deadline:
            # --backoff 0: every client straight back at once; retries still back off.
            base = args.backoff if not failures else max(args.backoff, 0.25)
            ceiling = min(args.backoff_cap, base * 2**failures)
            await asyncio.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))
            endpoint = target.resume(clients[i].endpoint, last_read(i))
            conn = StreamClient(endpoint)
            history[i].append(conn)
            attempts[i] += 1
            conn.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.connected.wait(), max(0.1, deadline - time.perf_counter()))
            if conn.connected_at and not conn.error and not conn.ended:
                resumed_at[i] = time.perf_counter()
                return
            failures += 1
            await conn.close()

    await asyncio.gather(*(come_back(i) for i in range(len(clients))))
    storm_seconds = time.perf_counter() - dropped_at
    client_cpu = time.process_time() - client_cpu
    await asyncio.sleep(args.settle)
    await publisher.stop()
    final = [seqs[-1] if seqs else 0 for seqs in publisher.seqs.values()]
    current = [h[-1] for h in history]
    await wait_until(
        lambda: all(c.ended or (c.seqs and max(c.seqs) >= final[session_of[i]]) or not final[session_of[i]]
                    for i, c in enumerate(current)),
        args.drain, step=0.25,
    )
    ok = [t for t in resumed_at if t is not None]
    report: dict[str, Any] = {
        "drop": args.drop, "killed_pids": killed,
        "clients": {
            "requested": len(clients), "connected_before": len(clients), "resumed": len(ok),
            "failed": len(clients) - len(ok),
            "attempts": {"total": sum(attempts), "max": max(attempts, default=0)},
            "all_resumed_s": round(max(ok) - dropped_at, 2) if len(ok) == len(clients) else None,
            "resume_ms": percentiles([t - dropped_at for t in ok]),
            "seconds": round(storm_seconds, 2),
        },
        "client_cpu_seconds": round(client_cpu, 2),
        "published": {"accepted": publisher.accepted, "failed": publisher.failures},
    }
    if isinstance(target, TandemTarget):
        lost = duplicates = reordered = delivered = 0
        for i, conns in enumerate(history):
            start = first_heads[i] or 0
            owed = {s for s in publisher.seqs[session_of[i]] if s > start}
            read = [s for conn in conns for s in conn.seqs if s >= 0]
            delivered += len(read)
            duplicates += len(read) - len(set(read))
            reordered += count_reordered(read)
            lost += len(owed - set(read))
        report.update(delivered=delivered, lost=lost, duplicates=duplicates, reordered=reordered)
    for c in current:
        await c.close()
    if restarted is not None:
        # The server this run started: stopped with the run (bounded, never left behind).
        restarted.terminate()
        try:
            await asyncio.wait_for(restarted.wait(), 20)
        except TimeoutError:
            restarted.kill()
            await restarted.wait()
    return report


SCENARIOS: dict[str, Scenario] = {
    "fanout": fanout, "echo": echo, "idle": idle, "first-delta": first_delta, "posts": posts,
    "churn": churn, "storm": storm, "reconnect-storm": reconnect_storm, "doc": docbench.doc,
}


# ---------------------------------------------------------------- command line


def _rates(raw: str) -> list[float]:
    try:
        rates = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("rates are numbers, comma-separated") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--url2", default="", help="doc: a second server process (same database and Redis)")
    p.add_argument("--target", choices=("tandem", "peer"), default="tandem")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--per-session", type=int, default=2, help="echo: clients per session")
    p.add_argument("--transport", choices=("sse", "ws", "mixed"), default="sse")
    p.add_argument("--types", default="bench.*",
                   help="Tandem's ?types= filter for fanout/idle/churn clients ('' for every event)")
    p.add_argument("--rate", type=_rates, default=[20.0],
                   help="events per second per session; a comma list runs one phase per rate")
    p.add_argument("--events", type=int, default=0, help="events per session per phase (else rate x duration)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (fanout, posts)")
    p.add_argument("--words", type=int, default=20, help="echo: words in each message")
    p.add_argument("--rounds", type=int, default=10, help="churn rounds / first-delta posts")
    p.add_argument("--hold", type=float, default=35.0, help="idle: seconds to hold the streams open")
    p.add_argument("--publishers", type=int, default=8, help="concurrent publishing requests")
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for a client to connect")
    p.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the last deliveries")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between connecting and measuring")
    p.add_argument("--agent", default="echo", help="the agent of the sessions the tool creates")
    p.add_argument("--allow-failed", action="store_true", help="go on when some clients fail to connect")
    p.add_argument("--drop", choices=("clients", "kill"), default="clients",
                   help="reconnect-storm: the clients close their sockets, or the server is killed (SIGKILL)")
    p.add_argument("--restart-cmd", default="", help="reconnect-storm --drop kill: the command that starts the server again")
    p.add_argument("--backoff", type=float, default=0.25,
                   help="reconnect-storm: first reconnect delay ceiling, seconds (doubles per failure, half of it random)")
    p.add_argument("--backoff-cap", type=float, default=10.0, help="reconnect-storm: the delay ceiling's cap")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout only)")
    return p


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args.target, args.url, args.publishers, args.agent)
    try:
        started = time.time()
        result = await SCENARIOS[args.scenario](args, target)
    finally:
        await target.aclose()
    return {
        "scenario": args.scenario, "target": args.target, "url": args.url,
        "params": {k: v for k, v in vars(args).items() if k not in ("scenario", "target", "url", "json")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        **result,
    }


def raise_fd_limit() -> int:
    """As many open files as this process may have: every client is a socket."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    limit = raise_fd_limit()
    if args.clients + 100 > limit:
        parser().error(f"--clients {args.clients} needs more open files than this process may have ({limit})")
    if args.clients < 1 or args.sessions < 1 or args.per_session < 1:
        parser().error("--clients, --sessions and --per-session must be at least 1")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        report = asyncio.run(amain(args))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    lost = report.get("lost", 0) + sum(p.get("lost", 0) for p in report.get("phases", []))
    return 1 if lost or report.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
