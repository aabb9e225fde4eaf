"""Where replies run.

A pool claims queued replies (``ReplyRun`` rows) from the database and runs each on this
process's runtime (the pool is one of its components); it renews their leases and stops
the ones asked to abort. In ``inline`` mode every server process has a pool; in
``worker`` mode the ``run_agents`` processes do, and server processes only queue the
reply and wake the workers through the channel layer. Either way the database row is the
queue, so a reply posted while no runner is up waits for one instead of being lost, and
the lease tells a dead runner from a slow one (``reap_forever`` ends the replies of dead
ones).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from typing import Any

from django.conf import settings

from events_app import groups, metrics
from events_app.fanout import Hub, get_hub, subscribe_eventually
from events_app.types import Frame
from project import liveness, runtime, views
from project.db import drain as drain_database_calls
from project.db import off_loop
from sessions_app import runs, services
from sessions_app.agents.runner import Run

log = logging.getLogger(__name__)

# How often an idle pool looks for queued replies whose wake-up it missed.
_POLL_SECONDS = 1.0


class Pool:
    # A hub listener for wake-ups only: no presence.
    wants_presence = False

    def __init__(self, rt: runtime.Runtime) -> None:
        self.runtime = rt
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.runs: dict[str, Run] = {}  # message id -> run
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.serving: asyncio.Task[None] | None = None
        self.accepting = True
        self.renew_asked = False  # renew the leases (and read the abort flags) at once

    # Listener protocol, for the workers' group (wake-ups) and the pool's own group (the
    # aborts and permission answers of its replies). No events come through either.
    def deliver(self, frame: Frame) -> None:
        pass

    def control(self, message: groups.Control) -> None:
        if isinstance(message, groups.Wake):
            self.wake.set()
        elif isinstance(message, (groups.Abort, groups.PermissionAnswered)):
            run = self.runs.get(message.message_id)
            if run is not None:
                run.control(message)
            elif isinstance(message, groups.Abort):
                # Claimed by this pool, but its claim is not read yet: the renewal right
                # after the claim reads the abort flag.
                self.renew_soon()

    def renew_soon(self) -> None:
        self.renew_asked = True
        self.wake.set()

    def start(self, *, listen: bool = False, persistent: bool = True) -> None:
        if self.serving is None or self.serving.done():
            self.serving = self.runtime.spawn(self.serve(listen=listen, persistent=persistent))

    async def serve(self, *, listen: bool, persistent: bool) -> None:
        """Claim and run replies. A pool that is not ``persistent`` (started on demand
        where no server runs: management commands, tests) stops once it has nothing to
        do, rather than polling the database for the life of the process. ``listen``:
        wake-ups come from the workers' group (worker mode) rather than from this process."""
        hub = get_hub()
        # Through Redis; until it answers, polling finds the replies and the lease
        # renewal their aborts.
        own = groups.pool_group(self.name)
        listened = [own, groups.WORKERS_GROUP] if listen else [own]
        loop = asyncio.get_running_loop()
        listening = [loop.create_task(self._listen(hub, group)) for group in listened]
        renew_every = settings.TANDEM_RUN_LEASE_SECONDS / 4
        next_renew = time.monotonic() + renew_every
        try:
            while True:
                self.wake.clear()
                try:
                    await self._claim()
                    if self.renew_asked or time.monotonic() >= next_renew:
                        next_renew = time.monotonic() + renew_every
                        asked, self.renew_asked = self.renew_asked, False
                        try:
                            await self._renew()
                        except Exception:
                            self.renew_asked = asked  # the next turn tries again
                            raise
                except Exception:  # the database went away for a moment: try again
                    log.exception("Agent pool %s could not claim or renew", self.name)
                # No await between this check and returning: a wake-up cannot slip in.
                if not persistent and not self.runs and not self.wake.is_set():
                    return
                wait = min(_POLL_SECONDS, max(0.0, next_renew - time.monotonic()))
                # asyncio.timeout rather than wait_for: no task made per wait (wait_for
                # wraps the wait in one, a new task every poll for as long as the pool runs).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
        finally:
            for task in listening:
                task.cancel()
            await asyncio.wait(listening)
            for group in listened:
                with contextlib.suppress(Exception):
                    await hub.unsubscribe(group, self)

    async def _listen(self, hub: Hub, group: str) -> None:
        await subscribe_eventually(hub, group, self)
        # What was sent before the subscription reached no one: look now.
        self.renew_soon()

    async def _claim(self) -> None:
        free = settings.TANDEM_AGENT_CONCURRENCY - len(self.runs)
        if free <= 0 or not self.accepting:
            return
        for claimed in await off_loop(services.claim_runs)(self.name, free):
            run = Run(
                claimed.session_id, claimed.message_id, claimed.agent, self.name,
                abort_requested=claimed.abort_requested,
            )
            self.runs[claimed.message_id] = run
            task = self.runtime.spawn(run.run())
            self.tasks[claimed.message_id] = task
            task.add_done_callback(functools.partial(self._when_done, claimed.message_id))

    def _when_done(self, message_id: str, _task: asyncio.Task[None]) -> None:
        self._ended(message_id)

    def _ended(self, message_id: str) -> None:
        self.runs.pop(message_id, None)
        self.tasks.pop(message_id, None)
        self.wake.set()  # room for the next queued reply

    async def _renew(self) -> None:
        lost, aborts = await off_loop(services.renew_leases)(self.name, list(self.runs))
        for message_id in lost:
            run = self.runs.get(message_id)
            # A run whose own finish is under way may just have deleted its row: its
            # finish's result tells, not this.
            if run is not None and not run.finishing:
                log.warning("Reply %s was ended elsewhere; stopping it here", message_id)
                run.abort(lost=True)
        for message_id in aborts:
            run = self.runs.get(message_id)
            if run is not None and not run.aborted.is_set():
                run.abort()

    async def drain(self, timeout: float) -> None:
        """Stop claiming; let running replies finish for up to ``timeout`` seconds, then
        end the rest ``interrupted`` now rather than when their leases lapse."""
        self.accepting = False
        if self.serving is not None:
            self.serving.cancel()
        pending = set(self.tasks.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        left = list(self.runs)
        for message_id in left:
            self.runs[message_id].abort(lost=True)
        if left:
            await off_loop(services.interrupt_runs)(self.name, left)
        # A run aborted above may be in a database call: the worker exits once none is.
        await drain_database_calls()

POOL = runtime.Component("agents pool", Pool)


def get_pool() -> Pool:
    """The pool of the running loop's runtime."""
    return POOL.get()


def _wake_local() -> None:
    pool = get_pool()
    pool.start(persistent=False)
    pool.wake.set()


def register() -> None:
    """Make this layer known to the ones below, which never import it: the run queue
    (``sessions_app.runs``) wakes this process's pool in inline mode; /readyz and /metrics
    report on replies and workers. Called once, from ``SessionsAppConfig.ready``."""
    runs.register_local_pool(_wake_local)
    views.add_ready_report("agents", agents_report)
    views.add_scrape_hook(_set_gauges)


def _set_gauges() -> None:
    metrics.ACTIVE_REPLIES.set(active_runs())
    nan = float("nan")  # unknown, rather than a stale or invented number
    try:
        report = agents_report()
    except Exception:
        report = {}
    metrics.REPLIES_QUEUED.set(report.get("queued", nan))
    metrics.REPLIES_RUNNING.set(report.get("running", nan))
    workers = report.get("workers")
    metrics.AGENT_WORKERS.set(nan if workers is None else workers)


def active_runs() -> int:
    return sum(len(pool.runs) for rt in runtime.every() if (pool := POOL.find(rt)) is not None)


def agents_report() -> dict[str, Any]:
    """Where replies run and how they fare, across every process: replies queued and
    running (the database), and in worker mode the agents workers alive (their
    heartbeats in Redis; ``null`` when Redis cannot tell). ``status`` is ``no_workers``
    when replies can only wait. Synchronous: it queries the database."""
    report: dict[str, Any] = {"mode": settings.TANDEM_AGENT_MODE, **services.reply_counts()}
    if settings.TANDEM_AGENT_MODE == "inline":
        report["status"] = "ok"  # every server process runs replies
        return report
    workers: int | None = None
    if settings.REDIS_URL:
        try:
            workers = len(liveness.alive("workers"))
        except Exception:
            log.warning("Cannot count agents workers: Redis unreachable")
    report["workers"] = workers
    report["status"] = "unknown" if workers is None else "ok" if workers else "no_workers"
    return report


async def reap_forever() -> None:
    """End the replies of runners that died (their leases lapsed). Every server process
    and worker runs this, so replies are recovered even when every worker is gone."""
    interval = max(1.0, settings.TANDEM_RUN_LEASE_SECONDS / 4)
    while True:
        try:
            ended = await off_loop(services.reap_expired_runs)()
            if ended:
                log.warning("Ended %d interrupted repl%s", ended, "y" if ended == 1 else "ies")
        except Exception:
            log.exception("Could not reap interrupted replies")
        await asyncio.sleep(interval)


async def start_inline() -> None:
    """Server start-up in inline mode: run replies here, including any queued before a
    restart."""
    get_pool().start()
