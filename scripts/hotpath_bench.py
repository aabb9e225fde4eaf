"""Micro-benchmark of the delivery hot path, in one process, no sockets: N streams on a
fake ASGI server, the hub hands them F events, and the CPU time per delivery is printed.

    python scripts/hotpath_bench.py [--clients 5000] [--events 200] [--batch 1] [--transport sse|ws]

Not part of ``bench/`` (the load tool imports nothing of the server): this one runs the
server's own code in-process.

The streams are real ``Connection``s behind the real consumers' writers; only the ASGI
server's ``send`` is a stand-in shaped like uvicorn's (a coroutine that checks for paused
writing, then hands the bytes to the transport), behind ``project.asgi``'s real access
log wrapper. ``--batch`` events reach the hub per turn of the event loop: 1 is a server
keeping up, more is a server behind (the hub reads several messages at once). What it
leaves out is the system call per write, the HTTP/WebSocket framing and Redis: it is for
comparing versions of the path quickly (docs/PERFORMANCE.md), the load tool is for what
a client sees.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")


class FakeServer:
    """The part of uvicorn's ``send`` that runs per body message."""

    def __init__(self) -> None:
        self.write_paused = False
        self.written = 0
        self.messages = 0

    async def send(self, message: dict[str, Any]) -> None:
        if self.write_paused:
            await asyncio.sleep(0)
        data = message.get("body")
        if data is None:
            data = message.get("text", "")
        self.written += len(data)
        self.messages += 1


async def access_logged(send: Any, scope_type: str) -> Any:
    """``send`` as the application sees it behind ``project.asgi``'s access log."""
    import logging

    from project.asgi import Tandem

    logging.getLogger("tandem.access").disabled = True  # the wrapper, without the lines
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, wrapped: Any) -> None:
        seen.append(wrapped)

    await Tandem(app)._logged({"type": scope_type, "path": "/bench"}, None, send)
    return seen[0]


async def run(args: argparse.Namespace) -> dict[str, float]:
    from django.contrib.auth import get_user_model

    from events_app import fanout, groups
    from events_app.consumers import SSEConsumer, StreamSocketConsumer
    from events_app.streams import Connection, StreamRequest
    from events_app.types import Frame, TypeFilter, encode

    user = get_user_model()(pk=1, username="bench")
    session_id = "ses_bench"
    group = groups.session_group(session_id)
    hub = fanout.get_hub()
    types = TypeFilter.parse(args.types) if args.types else None
    servers: list[FakeServer] = []
    conns: list[Connection] = []
    for i in range(args.clients):
        request = StreamRequest(user, None, session_id, args.transport, types, False, None, f"con_{i}")
        server = FakeServer()
        consumer: Any = SSEConsumer() if args.transport == "sse" else StreamSocketConsumer()
        consumer.base_send = await access_logged(
            server.send, "http" if args.transport == "sse" else "websocket"
        )
        conn = Connection(request, consumer._write)
        conn.positions[session_id] = 0
        servers.append(server)
        conns.append(conn)
    hub.groups[group] = set(conns)
    hub.presence[group] = set()
    tasks = [asyncio.ensure_future(c.run()) for c in conns]
    await asyncio.sleep(0.05)
    frames = [
        Frame(
            k + 1, session_id, "bench.tick",
            encode(seq=k + 1, session_id=session_id, type_name="bench.tick",
                   time="2026-01-01T00:00:00Z", properties={"bn": k, "pad": "x" * args.size}),
        )
        for k in range(args.events)
    ]
    for f in frames:  # encoded once per event, as the hub's frames are
        f.sse(False)
    gc.collect()
    started_cpu, started = time.process_time(), time.perf_counter()
    for k in range(0, len(frames), args.batch):
        for frame in frames[k:k + args.batch]:
            hub._deliver(group, frame)
        # Let every writer run before the next events arrive.
        for _ in range(3):
            await asyncio.sleep(0)
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    deliveries = args.clients * args.events
    messages = sum(s.messages for s in servers)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    hub.groups.pop(group, None)
    lost = deliveries - (messages if args.transport == "ws" else sum(c.positions[session_id] for c in conns))
    return {
        "deliveries": deliveries, "asgi_sends": messages, "lost": lost,
        "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
        "cpu_us_per_delivery": round(1e6 * cpu / deliveries, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--batch", type=int, default=1, help="events handed to the hub per loop turn")
    p.add_argument("--transport", choices=("sse", "ws"), default="sse")
    p.add_argument("--types", default="bench.*", help="each stream's ?types= ('' for none)")
    p.add_argument("--size", type=int, default=40, help="padding in each event's properties")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    import django

    django.setup()
    if args.uvloop:
        import uvloop

        uvloop.install()
    for _ in range(args.repeat):
        print(asyncio.run(run(args)), flush=True)


if __name__ == "__main__":
    main()
