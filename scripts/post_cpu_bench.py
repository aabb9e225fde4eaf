"""Server CPU per message post, in process: ``POST …/messages/`` through the ASGI app
(the request gate and the Django handler) as a server would call it, ``--concurrency``
at a time, timed with ``time.process_time()`` (this process's CPU: the requests, the
event loop, the in-memory layer; no HTTP parsing, no load tool). Rounds alternate
between Django's own ``ASGIHandler`` and ``project.handler.OneHopHandler`` so that both
see the same machine load (docs/PERFORMANCE.md, "Issue 12: message posts").

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/DB python scripts/post_cpu_bench.py

Run it against a scratch database: it migrates it and adds a user and sessions. With
``--only django`` it also runs from a copy of an older tree (``git archive``), for a
before/after of the whole post path."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("SECRET_KEY", "post-cpu-bench-only-0123456789-post-cpu-bench-only-0123456789")
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
os.environ.setdefault("TANDEM_HTTPS", "false")
os.environ.setdefault("TANDEM_RATE_WRITE", "none")
os.environ["TANDEM_AGENT_MODE"] = "worker"  # replies are not run here: only the post is measured
os.environ.pop("REDIS_URL", None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--posts", type=int, default=200, help="posts per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--only", choices=("django", "onehop"), default=None)
    args = p.parse_args()

    import django
    from django.core.management import call_command

    django.setup(set_prefix=False)
    call_command("migrate", verbosity=0)

    from django.contrib.auth import get_user_model
    from django.core.handlers.asgi import ASGIHandler
    from rest_framework_simplejwt.tokens import AccessToken

    from events_app.models import Event
    from project.asgi import RequestGate, _start
    from sessions_app import services
    from sessions_app.models import Message, ReplyRun, Session

    User = get_user_model()
    user, _ = User.objects.get_or_create(username="post-cpu-bench")
    token = str(AccessToken.for_user(user)).encode()
    sessions = [s.id for s in Session.objects.filter(owner=user)[: args.posts]]
    while len(sessions) < args.posts:
        sessions.append(services.create_session(user, title="bench", agent="echo").id)

    def reset() -> None:
        ReplyRun.objects.filter(session_id__in=sessions).delete()
        Message.objects.filter(session_id__in=sessions).delete()
        Event.objects.filter(session_id__in=sessions).delete()
        Session.objects.filter(pk__in=sessions).update(status={"type": "idle"})

    apps: dict[str, Any] = {"django": RequestGate(ASGIHandler())}
    if args.only != "django":  # --only django also runs on a tree from before the handler
        from project.handler import OneHopHandler

        apps["onehop"] = RequestGate(OneHopHandler())
    body = b'{"parts": [{"type": "text", "text": "hi"}]}'

    async def post(app: Any, session_id: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": f"/api/sessions/{session_id}/messages/", "raw_path": b"",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), (b"authorization", b"Bearer " + token)],
        }
        sent = False
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        done.set()
        return status

    async def one_round(name: str) -> tuple[float, float, dict[int, int]]:
        gate = asyncio.Semaphore(args.concurrency)
        codes: dict[int, int] = {}

        async def one(session_id: str) -> None:
            async with gate:
                code = await post(apps[name], session_id)
                codes[code] = codes.get(code, 0) + 1

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(s) for s in sessions))
        return time.process_time() - cpu, time.perf_counter() - wall, codes

    async def run() -> None:
        _start(asyncio.get_running_loop())
        names = [args.only] if args.only else ["django", "onehop"]
        results: dict[str, list[float]] = {n: [] for n in names}
        await asyncio.to_thread(reset)
        await one_round(names[0])  # warm-up
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                await asyncio.to_thread(reset)
                cpu, wall, codes = await one_round(name)
                ms = cpu / len(sessions) * 1e3
                results[name].append(ms)
                print(f"round {r + 1} {name:7s} {ms:6.2f} ms CPU/post  {len(sessions) / wall:6.1f} posts/s  {codes}", flush=True)
        for name, values in results.items():
            values.sort()
            print(f"{name:7s} median {values[len(values) // 2]:.2f} ms CPU/post (min {values[0]:.2f}, max {values[-1]:.2f})")

    asyncio.run(run())


if __name__ == "__main__":
    main()
