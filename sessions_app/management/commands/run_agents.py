"""``python manage.py run_agents``: a worker that runs agent replies, so server processes
only serve connections. Start as many as the load needs; they share the queue."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import uvloop
from django.conf import settings
from django.core.management.base import BaseCommand

from project import liveness, runtime
from sessions_app.agents.pool import active_runs, get_pool, reap_forever

log = logging.getLogger("tandem.worker")


class Command(BaseCommand):
    help = "Run agent replies queued by the server processes (worker mode)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--metrics-port", type=int, default=None,
            help="Serve this worker's Prometheus metrics at http://<--metrics-addr>:PORT/metrics.",
        )
        parser.add_argument(
            "--metrics-addr", default="127.0.0.1",
            help="The address the metrics port listens on (default 127.0.0.1).",
        )
        parser.add_argument(
            "--drain-seconds", type=float, default=30.0,
            help="On SIGTERM, how long running replies may take to finish before they "
            "are ended as interrupted.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            log.warning(
                "REDIS_URL is not set: this worker cannot be woken by server processes and "
                "will find replies by polling the database only."
            )
        if options["metrics_port"] is not None:
            from prometheus_client import start_http_server

            from events_app.metrics import ACTIVE_REPLIES

            ACTIVE_REPLIES.set_function(active_runs)  # read at scrape time
            start_http_server(options["metrics_port"], addr=options["metrics_addr"])
            log.info("Worker metrics on %s:%d", options["metrics_addr"], options["metrics_port"])
        # uvloop, as the servers run: the worker's loop moves every reply's outputs, hops
        # to the database and Redis messages.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._main(options["drain_seconds"]))

    async def _main(self, drain_seconds: float) -> None:
        loop = asyncio.get_running_loop()
        rt = runtime.bind(loop)  # this process's runtime, for the life of the worker
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pool = get_pool()
        pool.start(listen=True)
        reaper = rt.spawn(reap_forever())
        # /readyz and /metrics of the server processes count the workers that beat.
        beats = rt.spawn(liveness.beat_forever("workers", pool.name))
        log.info("Agent worker %s ready (concurrency %d)", pool.name, settings.TANDEM_AGENT_CONCURRENCY)
        if settings.TANDEM_LOG_FORMAT != "json":  # every JSON line is a log record
            self.stdout.write(f"ready {pool.name}", ending="\n")
            self.stdout.flush()
        await stop.wait()
        log.info("Agent worker %s stopping; draining %d repl(ies)", pool.name, len(pool.runs))
        reaper.cancel()
        beats.cancel()
        await pool.drain(drain_seconds)
        with contextlib.suppress(BaseException):
            await reaper
        if settings.REDIS_URL:
            with contextlib.suppress(Exception):
                liveness.forget("workers", pool.name)
        rt.close()  # the hub and the outbox stop here, not in asyncio.run's clean-up
