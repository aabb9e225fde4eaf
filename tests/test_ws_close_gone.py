"""Ending a WebSocket whose client has already gone (a stopping server ends every stream at
once) logs nothing: the close is not an error nobody retrieves."""
from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from events_app.consumers import StreamSocketConsumer


@pytest.mark.parametrize("gone", [OSError("reset"), ConnectionResetError()])
async def test_ending_a_stream_whose_client_is_gone_logs_nothing(gone: BaseException) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def send(message: dict[str, Any]) -> None:
        raise gone

    consumer = StreamSocketConsumer()
    consumer.base_send = send
    consumer.task = None
    consumer._end("shutdown")
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []
