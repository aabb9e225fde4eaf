"""``python manage.py mcp_server``: Tandem as an MCP server over stdio, for an agent
(Claude Code, opencode…) that starts it as a subprocess. It acts as the user whose JWT
is in ``TANDEM_MCP_TOKEN`` (or ``--token``; the environment keeps it out of ``ps``):
an access token or, for a server kept running for days, a refresh token from
``POST /api/auth/token/``. The token is checked at start and again on every call, so an
expired token or a disabled user stops working at once. Stdout carries only the protocol;
logs go to stderr."""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from mcp.server.mcpserver import Context

from project import runtime
from project.auth import read_any_token
from project.errors import ApiError
from sessions_app import mcp_server, runs


class Command(BaseCommand):
    help = "Serve Tandem's MCP tools over stdio, as the user of TANDEM_MCP_TOKEN (or --token)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--token", default=None,
            help="An access or refresh JWT of the user to act as (default: $TANDEM_MCP_TOKEN).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        token = options["token"] or os.environ.get("TANDEM_MCP_TOKEN", "")
        if not token:
            raise CommandError("Give the user's token in TANDEM_MCP_TOKEN (or --token).")
        try:
            read_any_token(token)
        except ApiError as err:
            raise CommandError(f"TANDEM_MCP_TOKEN: {err.message}") from None
        asyncio.run(self._serve(token))

    async def _serve(self, token: str) -> None:
        rt = runtime.bind(asyncio.get_running_loop())
        # Replies to messages posted here are left to the server processes (inline mode:
        # their pools find queued replies within a second) or the workers: this process
        # ends whenever its client does, which would interrupt a reply it had claimed.
        runs.register_local_pool(lambda: None)

        async def identify(ctx: Context) -> int:
            return read_any_token(token)  # expiry is checked on every call

        try:
            await mcp_server.build(identify).run_stdio_async()
        finally:
            sys.stdout.flush()
            rt.close()
