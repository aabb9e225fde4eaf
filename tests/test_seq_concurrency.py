"""Per-session seqs under real concurrency: many threads, and many OS processes, call
``events_app.services.publish`` on one session at the same moment. Afterwards the log
holds exactly 1..N, each once, and ``Session.last_seq`` is N."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from django.db import connections

from events_app.models import Event
from events_app.services import publish
from sessions_app.models import Session
from tests import conftest

pytestmark = [pytest.mark.django_db(transaction=True)]

PUBLISHER_SCRIPT = """
import os, sys, time, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()
from events_app.services import publish
session_id, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # the start signal: every process publishes at the same moment
for i in range(count):
    publish(session_id, "task.progress", {"worker": worker, "i": i})
    # A breath between writes: SQLite's lock can otherwise let one process publish all
    # of its events before the others get the go, and the test would show nothing.
    time.sleep(0.003)
print("done", flush=True)
"""


def assert_contiguous_log(session_id: str, expected_total: int) -> list[dict[str, Any]]:
    seqs = list(Event.objects.filter(session_id=session_id).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, expected_total + 1))
    assert Session.objects.get(pk=session_id).last_seq == expected_total
    return [
        orjson_loads(envelope)
        for envelope in Event.objects.filter(session_id=session_id).order_by("seq").values_list("envelope", flat=True)
    ]


def orjson_loads(raw: str) -> dict[str, Any]:
    import orjson

    return orjson.loads(raw)  # type: ignore[no-any-return]


def test_threads_publishing_at_once_get_unique_contiguous_seqs(shared_session: Any) -> None:
    sid = shared_session.id
    head = Session.objects.get(pk=sid).last_seq
    n_threads, per_thread = 8, 25
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    returned: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        try:
            barrier.wait(timeout=10)
            mine = [publish(sid, "task.progress", {"worker": w, "i": i}).seq for i in range(per_thread)]
            with lock:
                returned.extend(s for s in mine if s is not None)
            # Each thread's own seqs increase: a writer never sees its events reordered.
            assert mine == sorted(mine)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    total = head + n_threads * per_thread
    events = assert_contiguous_log(sid, total)
    assert sorted(returned) == list(range(head + 1, total + 1))
    # Every envelope carries the seq it is stored under, and each (worker, i) is there once.
    assert all(e["seq"] == i + 1 for i, e in enumerate(events))
    published = [(e["properties"]["worker"], e["properties"]["i"]) for e in events[head:]]
    assert sorted(published) == [(w, i) for w in range(n_threads) for i in range(per_thread)]


def test_os_processes_publishing_at_once_get_unique_contiguous_seqs(shared_session: Any) -> None:
    # On PostgreSQL the processes contend for the session row; on SQLite for the file's
    # write lock (IMMEDIATE transactions with a busy timeout). Both must serialise them.
    sid = shared_session.id
    head = Session.objects.get(pk=sid).last_seq
    n_procs, per_proc = 4, 30
    env = {
        **os.environ,
        "DATABASE_URL": conftest.test_database_url(),
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    env.pop("REDIS_URL", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER_SCRIPT, sid, f"p{w}", str(per_proc)],
            cwd=conftest.ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for w in range(n_procs)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == b"ready", (line, proc.stderr.read() if proc.stderr else b"")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            assert out.strip() == b"done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = head + n_procs * per_proc
    events = assert_contiguous_log(sid, total)
    published = [(e["properties"]["worker"], e["properties"]["i"]) for e in events[head:]]
    assert sorted(published) == sorted((f"p{w}", i) for w in range(n_procs) for i in range(per_proc))
    # They really ran at the same time: the log interleaves the processes' events.
    runs = sum(1 for a, b in zip(published, published[1:], strict=False) if a[0] != b[0])
    assert runs > n_procs - 1
