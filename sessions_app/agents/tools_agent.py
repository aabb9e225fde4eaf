"""``tools``: a small agent that uses real tools through the permission flow.

``!calc <expression>`` asks permission to run the calculator and answers
``<expression> = <result>``; ``!time`` (no permission needed) tells the server time;
``!mcp <server>.<tool> <json object>`` calls a tool of a configured MCP server
(``TANDEM_MCP_SERVERS``) and answers with its result; anything else is echoed.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sessions_app.agents.base import Agent, Output, ReplyContext, TextDelta, register
from sessions_app.agents.echo import EchoAgent


@register
class ToolsAgent(Agent):
    name = "tools"

    async def reply(self, ctx: ReplyContext) -> AsyncIterator[Output]:
        text = ctx.last_user_text.strip()
        command, _, rest = text.partition(" ")
        if command == "!calc":
            expression = rest.strip()
            result = await ctx.use_tool("calculator", {"expression": expression})
            if result.ok:
                yield TextDelta(f"{expression} = {_number(result.output)}")
            elif result.rejected:
                yield TextDelta(f"I did not run the calculator ({result.error})")
            else:
                yield TextDelta(f"I could not calculate {expression}: {result.error}")
        elif text == "!time":
            result = await ctx.use_tool("time", {})
            if result.ok:
                yield TextDelta(f"The server time is {result.output}.")
            else:
                yield TextDelta(f"I could not read the time: {result.error}")
        elif command == "!mcp":
            async for output in _mcp(ctx, rest.strip()):
                yield output
        else:
            async for output in EchoAgent().reply(ctx):
                yield output


async def _mcp(ctx: ReplyContext, rest: str) -> AsyncIterator[Output]:
    name, _, raw = rest.partition(" ")
    if not name:
        yield TextDelta("Usage: !mcp <server>.<tool> <JSON object of arguments>")
        return
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except ValueError:
        yield TextDelta(f"The arguments for {name} are not JSON: {raw.strip()}")
        return
    result = await ctx.use_tool(name, arguments)
    if result.ok:
        shown = result.output if isinstance(result.output, str) else json.dumps(result.output)
        yield TextDelta(f"{name}: {shown}")
    elif result.rejected:
        yield TextDelta(f"I did not run {name} ({result.error})")
    else:
        yield TextDelta(f"{name} failed: {result.error}")


def _number(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)
