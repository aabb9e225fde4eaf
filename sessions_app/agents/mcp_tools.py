"""Tools of outside MCP servers (``TANDEM_MCP_SERVERS``), offered to the agents as
``<server>.<tool>``. They go through the runner like the built-in tools: a tool part,
the permission flow (each server's ``needs_permission``, default on, overridable per
tool), ``tool.status``, a timeout (the server's ``timeout`` or ``TANDEM_TOOL_TIMEOUT``)
and abort.

Each call opens its own connection (for a stdio server: its own process), calls the
tool and closes it. Nothing is shared between calls, so a server that crashed or hung
in one call cannot break the next, and cancelling a call (timeout, abort) ends exactly
that call's process. Tool listings (names, descriptions, input schemas) are read once
per process and kept; a server that cannot be listed offers no tools until it can.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
from django.conf import settings
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from sessions_app.agents.tools import Tool, ToolFailed

log = logging.getLogger(__name__)

SEPARATOR = "."  # Tandem's tool name is <server>.<tool>
MAX_NAME = 64  # a tool part's and a permission request's tool column
_FUNCTION_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class McpTool(Tool):
    server: str = ""
    remote_name: str = ""

    def check_input(self, input: Any) -> dict[str, Any]:
        """Only the shape: the MCP server validates its arguments against its own schema
        and answers an invalid call with an error result, which the user then sees."""
        if not isinstance(input, dict):
            raise ToolFailed("The tool's input must be a JSON object.")
        return input


def servers() -> dict[str, dict[str, Any]]:
    servers: dict[str, dict[str, Any]] = settings.TANDEM_MCP_SERVERS
    return servers


def get(name: str, *, description: str = "", parameters: dict[str, Any] | None = None) -> McpTool | None:
    """The tool ``<server>.<tool>`` of a configured server, or None. Known without asking
    the server, so ``!mcp`` works even when the server could not be listed."""
    server, sep, remote = name.partition(SEPARATOR)
    conf = servers().get(server)
    if not sep or not remote or conf is None or len(name) > MAX_NAME:
        return None
    per_tool = conf["tools"].get(remote, {})
    return McpTool(
        name=name,
        description=description,
        parameters=parameters or {"type": "object"},
        needs_permission=per_tool.get("needs_permission", conf["needs_permission"]),
        run=_not_sync,
        arun=lambda arguments: call(server, remote, arguments),
        timeout=conf["timeout"],
        server=server,
        remote_name=remote,
    )


def _not_sync(input: dict[str, Any]) -> Any:
    raise ToolFailed("An MCP tool runs asynchronously.")


def function_name(tool: Tool) -> str:
    """A name function calling accepts (``[A-Za-z0-9_-]{1,64}``): ``<server>__<tool>``."""
    return _FUNCTION_UNSAFE.sub("_", tool.name.replace(SEPARATOR, "__", 1))[:64]


@asynccontextmanager
async def _connect(server: str) -> AsyncIterator[Client]:
    conf = servers()[server]
    if conf["transport"] == "stdio":
        target: Any = StdioServerParameters(
            command=conf["command"], args=conf["args"], env=conf["env"] or None, cwd=conf["cwd"]
        )
        async with Client(target) as client:
            yield client
    else:
        async with httpx2.AsyncClient(headers=conf["headers"]) as http:
            async with Client(streamable_http_client(conf["url"], http_client=http)) as client:
                yield client


async def call(server: str, tool: str, arguments: dict[str, Any]) -> Any:
    """Call one tool: its structured result if it has one, else its text (one string, or
    a list of content blocks when it is not all text). ToolFailed for an error result or
    a server that fails (exits, answers nonsense, refuses the connection)."""
    try:
        async with _connect(server) as client:
            result = await client.call_tool(tool, arguments)
    except asyncio.CancelledError:
        raise
    except ToolFailed:
        raise
    except BaseException as exc:  # anyio wraps failures in exception groups
        if not isinstance(exc, Exception | BaseExceptionGroup):
            raise
        log.warning("MCP server %s failed in %s: %r", server, tool, exc)
        raise ToolFailed(f"The MCP server {server!r} failed: {_describe(exc)}") from None
    blocks = [block.model_dump(mode="json", exclude_none=True, by_alias=True) for block in result.content]
    text = "\n".join(b["text"] for b in blocks if b.get("type") == "text")
    if result.is_error:
        raise ToolFailed(text or "The MCP tool reported an error.")
    if result.structured_content is not None:
        return result.structured_content
    if all(b.get("type") == "text" for b in blocks):
        return text
    return blocks


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


_LISTED: dict[str, list[McpTool]] = {}


async def offered() -> list[McpTool]:
    """Every configured server's tools, with descriptions and input schemas, for a model
    to choose from. Listed once per process (bounded by each server's timeout); a server
    that fails to list is skipped and asked again next time."""
    missing = [name for name in servers() if name not in _LISTED]
    if missing:
        await asyncio.gather(*(_list(name) for name in missing))
    return [tool for name in servers() for tool in _LISTED.get(name, [])]


async def _list(server: str) -> None:
    conf = servers()[server]
    try:
        async with asyncio.timeout(conf["timeout"] or settings.TANDEM_TOOL_TIMEOUT):
            async with _connect(server) as client:
                listing = await client.list_tools()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if not isinstance(exc, Exception | BaseExceptionGroup):
            raise
        log.warning("MCP server %s could not be listed: %s", server, _describe(exc))
        return
    found = []
    for remote in listing.tools:
        tool = get(
            f"{server}{SEPARATOR}{remote.name}",
            description=remote.description or remote.title or remote.name,
            parameters=remote.input_schema,
        )
        if tool is not None:
            found.append(tool)
    _LISTED[server] = found


def forget_listings() -> None:
    """Drop the kept listings (tests change the configured servers)."""
    _LISTED.clear()
