"""``tools``: a small agent that uses real tools through the permission flow.

``!calc <expression>`` asks permission to run the calculator and answers
``<expression> = <result>``; ``!time`` (no permission needed) tells the server time;
anything else is echoed.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from sessions_app.agents.base import Agent, Output, ReplyContext, TextDelta, register
from sessions_app.agents.echo import EchoAgent


@register
class ToolsAgent(Agent):
    name = "tools"
    commands = (
        ("!calc <expression>", "Ask to run the calculator (needs an editor's approval)"),
        ("!time", "Tell the server's time"),
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
        elif text == "!time":
            result = await ctx.use_tool("time", {})
            if result.ok:
                yield TextDelta(f"The server time is {result.output}.")
            else:
                yield TextDelta(f"I could not read the time: {result.error}")
        else:
            async for output in EchoAgent().reply(ctx):
                yield output


def _number(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)
