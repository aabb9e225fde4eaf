"""A quick fan-out check against a running Tandem: N SSE clients on one session, M
custom events published over REST, then loss, duplicates, order and delivery latency.

    python -m bench.quick_fanout --url http://127.0.0.1:8000 --clients 200 --events 200

Loopback only; bounded in count and time. The full benchmark is issue 6's ``bench/``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from urllib.parse import urlparse

import httpx


async def sse_client(host: str, port: int, path: str, out: list[tuple[int, float]], ready: asyncio.Event, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    buf = b""
    try:
        while not stop.is_set():
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: "):
                        env = json.loads(line[6:])
                        if env["type"] == "server.connected":
                            ready.set()
                        elif env["type"] == "bench.tick":
                            out.append((env["seq"], time.time() - env["properties"]["sent"]))
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument(
        "--types", default="bench.*",
        help="the clients' ?types= filter; '' also delivers every client's presence.joined to every client",
    )
    parser.add_argument("--by-seq", action="store_true", help="also print each event's worst latency")
    args = parser.parse_args()
    parsed = urlparse(args.url)
    assert parsed.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as http:
        name, password = f"bench{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        (await http.post("/api/auth/register/", json={"username": name, "password": password})).raise_for_status()
        token = (await http.post("/api/auth/token/", json={"username": name, "password": password})).json()["access"]
        auth = {"Authorization": f"Bearer {token}"}
        session = (await http.post("/api/sessions/", json={"title": "bench"}, headers=auth)).json()
        ticket = (await http.post("/api/auth/ticket/", headers=auth)).json()["ticket"]
        path = f"/api/sessions/{session['id']}/stream/?ticket={ticket}"
        if args.types:
            path += f"&types={args.types}"
        stop = asyncio.Event()
        results: list[list[tuple[int, float]]] = [[] for _ in range(args.clients)]
        readies = [asyncio.Event() for _ in range(args.clients)]
        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(sse_client(parsed.hostname or "127.0.0.1", parsed.port or 80, path, results[i], readies[i], stop))
            for i in range(args.clients)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        connect_s = time.monotonic() - t0
        t1 = time.monotonic()
        for i in range(args.events):
            await http.post(
                f"/api/sessions/{session['id']}/events/",
                json={"type": "bench.tick", "properties": {"i": i, "sent": time.time()}},
                headers=auth,
            )
            await asyncio.sleep(max(0.0, t1 + (i + 1) / args.rate - time.monotonic()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(len(r) < args.events for r in results):
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t1
        stop.set()
        for task in tasks:
            task.cancel()
    latencies = sorted(lat for r in results for _, lat in r)
    delivered = len(latencies)
    expected = args.clients * args.events
    dups = sum(len(r) - len({s for s, _ in r}) for r in results)
    reordered = sum(any(b[0] <= a[0] for a, b in zip(r, r[1:])) for r in results)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    report = {
        "clients": args.clients, "events": args.events, "connect_s": round(connect_s, 2),
        "delivered": delivered, "expected": expected, "lost": expected - delivered + dups,
        "duplicates": dups, "clients_reordered": reordered,
        "deliveries_per_s": round(delivered / elapsed, 1),
        "latency_ms": {"p50": round(pct(0.5), 1), "p90": round(pct(0.9), 1), "p99": round(pct(0.99), 1),
                       "max": round(latencies[-1] * 1000, 1) if latencies else None,
                       "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None},
    }
    if args.by_seq:
        worst: dict[int, float] = {}
        for r in results:
            for seq, lat in r:
                worst[seq] = max(worst.get(seq, 0.0), lat)
        report["worst_ms_by_seq"] = {s: round(v * 1000, 1) for s, v in sorted(worst.items())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
