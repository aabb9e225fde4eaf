"""Micro-benchmark of the code issue 16 moved onto libraries, against the hand-written
code it replaced (kept below, verbatim in what it computes, as the baseline):

- the ``openai`` agent's event-stream reading: ``aiter_lines`` and a hand-written field
  parser, against httpx-sse's ``EventSource.aiter_sse`` (both through the agent's own
  ``_chunk``), per event, on an in-memory response whose body arrives one event per read
  as a provider streams it;
- a tool's input check: the hand-written shape check, against jsonschema with the
  validator built once per tool, per call, valid and invalid input;
- for scale, one ``JsonFormatter`` log line (python-json-logger) and the cost a load
  client would pay per event reading a stream through httpx + httpx-sse;
- the shared document's y-websocket frames, kept by hand (``events_app/docsocket.py``),
  against pycrdt's own ``create_update_message`` and ``Decoder``, per 512-byte update.

    python scripts/libs_bench.py [--events 20000] [--repeat 5]

CPU time (``time.process_time``), lowest of the repeats; in one process, no sockets.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django

django.setup()

import httpx  # noqa: E402
import pycrdt  # noqa: E402
from httpx_sse import EventSource  # noqa: E402

from events_app import docsocket  # noqa: E402
from project.logfilters import JsonFormatter  # noqa: E402
from sessions_app.agents import openai  # noqa: E402
from sessions_app.agents.tools import TOOLS, Tool, ToolFailed  # noqa: E402


class _Body(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def _response(pieces: list[bytes]) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Body(pieces))


async def _hand_written_parse(response: httpx.Response, turn: Any) -> AsyncIterator[Any]:
    """The agent's parser before issue 16."""
    data: list[str] = []
    async with aclosing(cast(AsyncGenerator[str, None], response.aiter_lines())) as lines:
        while True:
            line = await anext(lines, None)
            if line is not None and line.startswith(":"):
                continue
            if line:
                field_name, _, value = line.partition(":")
                if field_name == "data":
                    data.append(value[1:] if value.startswith(" ") else value)
                continue
            if data:
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                for output in openai._chunk(payload, turn):
                    yield output
            if line is None:
                return


def _hand_written_check(tool: Tool, input: Any) -> dict[str, Any]:
    """``Tool.check_input`` before issue 16."""
    if not isinstance(input, dict):
        raise ToolFailed("The tool's input must be a JSON object.")
    properties = tool.parameters.get("properties", {})
    unknown = sorted(set(input) - set(properties))
    if unknown:
        raise ToolFailed(f"Unknown argument(s): {', '.join(unknown)}.")
    for name in tool.parameters.get("required", []):
        if name not in input:
            raise ToolFailed(f"Missing argument: {name}.")
    for name, value in input.items():
        if properties[name].get("type") == "string" and not isinstance(value, str):
            raise ToolFailed(f"Argument {name} must be a string.")
    return input


def _stream_pieces(events: int) -> list[bytes]:
    pieces = []
    for i in range(events):
        chunk = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        }
        pieces.append(f"data: {json.dumps(chunk)}\n\n".encode())
    pieces.append(b"data: [DONE]\n\n")
    return pieces


async def _read(parse: Callable[[httpx.Response, Any], AsyncIterator[Any]], pieces: list[bytes]) -> int:
    count = 0
    response = _response(pieces)
    async for _ in parse(response, openai._Round()):
        count += 1
    await response.aclose()
    return count


async def _events_only(response: httpx.Response, turn: Any) -> AsyncIterator[Any]:
    """httpx-sse alone: what any reader of a stream through httpx pays per event."""
    async with aclosing(EventSource(response).aiter_sse()) as events:
        async for event in events:
            if event.data != "[DONE]":
                yield event


def _lowest(repeat: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = args.events, args.repeat
    pieces = _stream_pieces(n)
    loop = asyncio.new_event_loop()
    rows: list[tuple[str, float]] = []

    readers: tuple[tuple[str, Callable[[httpx.Response, Any], AsyncIterator[Any]]], ...] = (
        ("SSE, hand-written (aiter_lines), per event, the agent's _chunk included", _hand_written_parse),
        ("SSE, httpx-sse, per event, the agent's _chunk included", openai._parse),
        ("SSE, httpx-sse alone (no JSON), per event", _events_only),
    )
    for label, parse in readers:
        assert loop.run_until_complete(_read(parse, pieces)) == n
        seconds = _lowest(repeat, lambda parse=parse: loop.run_until_complete(_read(parse, pieces)))
        rows.append((label, seconds / n))

    calculator = TOOLS["calculator"]
    good, bad = {"expression": "2*(3+4)"}, {"expression": 42}
    calculator.check_input(good)  # the validator is built once per tool, on first use

    def checks(check: Callable[[Tool, Any], Any], input: Any) -> None:
        for _ in range(n):
            try:
                check(calculator, input)
            except ToolFailed:
                pass

    for label, check in (("hand-written", _hand_written_check), ("jsonschema", Tool.check_input)):
        for kind, input in (("valid", good), ("invalid", bad)):
            seconds = _lowest(repeat, lambda check=check, input=input: checks(check, input))
            rows.append((f"tool input, {label}, {kind}, per call", seconds / n))

    formatter = JsonFormatter()
    record = logging.LogRecord("tandem.bench", logging.INFO, __file__, 1, "GET %s %s", ("/api/x", 200), None)
    seconds = _lowest(repeat, lambda: [formatter.format(record) for _ in range(n)])
    rows.append(("JSON log line (python-json-logger OrjsonFormatter + redaction)", seconds / n))

    payload = bytes(range(256)) * 2
    frame = docsocket.sync_frame(2, payload)
    assert frame == pycrdt.create_update_message(payload)

    def pycrdt_decode() -> bytes | None:
        decoder = pycrdt.Decoder(frame)
        decoder.read_var_uint()
        decoder.read_var_uint()
        return decoder.read_message()

    frames: tuple[tuple[str, Callable[[], object]], ...] = (
        ("y-websocket update frame, encoded by hand (docsocket.sync_frame)", lambda: docsocket.sync_frame(2, payload)),
        ("y-websocket update frame, encoded by pycrdt.create_update_message", lambda: pycrdt.create_update_message(payload)),
        ("y-websocket update frame, decoded by hand (docsocket.parse_frame)", lambda: docsocket.parse_frame(frame)),
        ("y-websocket update frame, decoded by pycrdt.Decoder (no truncation check)", pycrdt_decode),
    )
    for label, work in frames:
        seconds = _lowest(repeat, lambda work=work: [work() for _ in range(n)])
        rows.append((label, seconds / n))

    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    width = max(len(label) for label, _ in rows)
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()
