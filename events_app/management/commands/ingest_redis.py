"""``python manage.py ingest_redis``: bridge a Redis pub/sub pattern into sessions.

Runs until SIGTERM or SIGINT, then logs its counts and exits 0. See ``events_app.ingest``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from events_app import publishing
from events_app.ingest import IngestStats, RedisIngest, pattern_prefix
from project.errors import NotFound

log = logging.getLogger("events_app.ingest")


class Command(BaseCommand):
    help = (
        "Subscribe to a Redis pattern (default TANDEM_INGEST_PATTERN, 'tandem:ingest:*') and "
        "publish each JSON message {\"type\", \"properties\"} into the session named by the "
        "channel's suffix, on behalf of a service user who must be an editor of it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--pattern", default=None,
                            help="A fixed prefix followed by '*' (default: TANDEM_INGEST_PATTERN).")
        parser.add_argument("--user", default=None,
                            help="The service user to publish as (default: TANDEM_INGEST_USER).")
        parser.add_argument("--redis-url", default=None, help="Default: REDIS_URL.")

    def handle(self, *args: Any, **options: Any) -> None:
        pattern = options["pattern"] or settings.TANDEM_INGEST_PATTERN
        username = (
            options["user"]
            or getattr(settings, "TANDEM_INGEST_USER", "")
            or os.environ.get("TANDEM_INGEST_USER", "")
        )
        redis_url = options["redis_url"] or settings.REDIS_URL
        if not redis_url:
            raise CommandError("No Redis to subscribe to: pass --redis-url or set REDIS_URL.")
        if not username:
            raise CommandError("No service user: pass --user or set TANDEM_INGEST_USER.")
        try:
            pattern_prefix(pattern)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            publishing.resolve_user(username)
        except NotFound as exc:
            raise CommandError(exc.message) from None

        stats = asyncio.run(self._run(redis_url, pattern, username))
        if not publishing.flush(5.0):
            log.warning("Some published events were not sent on before exit")
        log.info("ingest_redis stopped: %s", stats.summary())

    async def _run(self, redis_url: str, pattern: str, username: str) -> IngestStats:
        bridge = RedisIngest(redis_url, pattern, username)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop.set)
        try:
            return await bridge.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
