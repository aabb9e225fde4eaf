"""``tools``: a small agent that uses real tools through the permission flow.

``!calc <expression>`` asks permission to run the calculator and answers
``<expression> = <result>``; ``!time`` (no permission needed) tells the server time;
``!doc append <text>`` asks permission for ``doc_edit`` and adds the text to the shared
document as a new paragraph; ``!mcp <server>.<tool> <json object>`` calls a tool of a
configured MCP server (``TANDEM_MCP_SERVERS``) and answers with its result; anything else
is echoed.
"""
from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from sessions_app.agents.base import Agent, Output, ReplyContext, TextDelta, register
from sessions_app.agents.echo import EchoAgent


@register
class ToolsAgent(Agent):
    name = "tools"
    commands = (
        ("!calc <expression>", "Ask to run the calculator (needs an editor's approval)"),
        ("!time", "Tell the server's time"),
        ("!doc append <text>", "Ask to add a paragraph to the shared document (needs an editor's approval)"),
        ("!mcp <server>.<tool> <json>", "Call a tool of a configured MCP server"),
    )

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
        elif _DOC.match(text):
            yield TextDelta(await _doc(ctx, text))
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


_DOC = re.compile(r"!doc(\s|$)")
_DOC_APPEND = re.compile(r"!doc\s+append\s+(\S.*)", re.DOTALL)
DOC_USAGE = "Usage: !doc append <text>"


async def _doc(ctx: ReplyContext, text: str) -> str:
    match = _DOC_APPEND.fullmatch(text)
    if match is None:
        return DOC_USAGE
    result = await ctx.use_tool("doc_edit", {"append": match[1]})
    if result.ok:
        return "I added it to the document as a new paragraph."
    if result.rejected:
        return f"I did not change the document ({result.error})"
    return f"I could not change the document: {result.error}"


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
