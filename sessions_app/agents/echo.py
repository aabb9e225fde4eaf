"""``echo``: replies with the user's own text, word by word, whitespace kept."""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from django.conf import settings

from sessions_app.agents.base import Agent, Output, ReplyContext, TextDelta, register

_WORDS = re.compile(r"\s*\S+\s*|\s+")


def chunks(text: str) -> list[str]:
    """Words with the whitespace around them; they concatenate back to ``text``."""
    return _WORDS.findall(text)


@register
class EchoAgent(Agent):
    name = "echo"

    async def reply(self, ctx: ReplyContext) -> AsyncIterator[Output]:
        delay = settings.TANDEM_ECHO_DELAY_MS / 1000
        for i, chunk in enumerate(chunks(ctx.last_user_text)):
            if i and delay:
                await asyncio.sleep(delay)
            yield TextDelta(chunk)
