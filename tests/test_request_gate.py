"""Django requests are limited per process (the event loop keeps its share of the GIL);
streams are not."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from project.asgi import RequestGate


async def no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_no_more_requests_run_at_once_than_the_limit_and_the_rest_wait(settings: Any) -> None:
    settings.TANDEM_MAX_CONCURRENT_REQUESTS = 2
    running = peak = done = 0
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    gate = RequestGate(app)
    calls = [asyncio.create_task(gate({"type": "http"}, no_body, None)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert (running, done) == (2, 0)  # three wait at the gate, not in threads
    release.set()
    await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert (peak, done) == (2, 5)


async def test_a_failing_request_gives_its_place_back(settings: Any) -> None:
    settings.TANDEM_MAX_CONCURRENT_REQUESTS = 1

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    gate = RequestGate(broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(gate({"type": "http"}, no_body, None), 1)
