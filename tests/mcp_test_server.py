"""A real MCP server for the tests, over stdio: ``python tests/mcp_test_server.py``.

``add`` and ``shout`` work; ``fail`` answers with an error result; ``crash`` kills the
server's process in the middle of the call; ``hang`` never answers. When
``MCP_TEST_PIDFILE`` is set, the server writes its process id there at start, so a test
can check that a timed-out or aborted call's process is gone.
"""
from __future__ import annotations

import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("tandem-test", log_level="ERROR")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def fail(why: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(why)


@server.tool()
def crash() -> str:
    """Kills the server's process while the call is in flight."""
    os._exit(3)


@server.tool()
def hang() -> str:
    """Never returns."""
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    pidfile = os.environ.get("MCP_TEST_PIDFILE")
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    server.run("stdio")
