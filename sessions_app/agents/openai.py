"""``openai``: streams Chat Completions from any OpenAI-compatible server, with tools.

The chunks are read here rather than by a provider's SDK because compatible servers differ
in small ways (role-only chunks, ``reasoning`` vs ``reasoning_content``, usage-only
chunks) and every one of them must be tolerated. The event stream itself (CRLF, comment
keep-alives, multi-line data) is httpx-sse's: it follows the WHATWG parsing rules, which
is all a compatible server can rely on.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import httpx
from django.conf import settings
from httpx_sse import EventSource, SSEError

from sessions_app.agents import mcp_tools
from sessions_app.agents.base import (
    Agent,
    AgentError,
    DocumentText,
    Output,
    ReasoningDelta,
    ReplyContext,
    Retrying,
    TextDelta,
    ToolResult,
    Usage,
    register,
)
from sessions_app.agents.tools import TOOLS, Tool

SYSTEM_PROMPT = (
    "You are a helpful assistant in a shared session that several people may be reading. "
    "Be concise. Use the tools when they help."
)
MAX_ROUNDS = 8  # model requests per reply; bounds a model that keeps calling tools
MAX_RETRY_AFTER = 60.0  # caps a provider's Retry-After: a reply should not sit silent for minutes


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class _Round:
    """What one streamed response produced besides its outputs."""

    text: str = ""
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    started: bool = False  # an output was yielded: from here on, retrying would repeat it


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, timeout: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.timeout = timeout


@register
class OpenAIAgent(Agent):
    name = "openai"

    async def reply(self, ctx: ReplyContext) -> AsyncIterator[Output]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        document = await ctx.read_document()
        if document is not None:
            messages.append({"role": "system", "content": _document_prompt(document)})
        messages += [
            {"role": m["role"], "content": str(m["text"])}
            for m in ctx.history
            if m.get("role") in ("user", "assistant") and m.get("text")
        ]
        # The configured MCP servers' tools come after the built-in ones, under a function
        # name the providers accept (``server__tool``); ``names`` maps it back.
        offered: dict[str, Tool] = {t.name: t for t in TOOLS.values()}
        for tool in await mcp_tools.offered():
            offered.setdefault(mcp_tools.function_name(tool), tool)
        names = {function: t.name for function, t in offered.items()}
        tools = [
            {
                "type": "function",
                "function": {"name": function, "description": t.description, "parameters": t.parameters},
            }
            for function, t in offered.items()
        ]
        timeout = httpx.Timeout(float(settings.TANDEM_OPENAI_TIMEOUT))
        # ``async with`` on the client and on each stream: a CancelledError (abort) unwinds
        # through them and closes the upstream connection, so the provider stops generating.
        async with httpx.AsyncClient(timeout=timeout) as client:
            for round_no in range(1, MAX_ROUNDS + 1):
                body: dict[str, Any] = {
                    "model": settings.TANDEM_OPENAI_MODEL,
                    "messages": messages,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                if tools:
                    body["tools"] = tools
                    if round_no == MAX_ROUNDS:
                        # Out of rounds: the model must answer in words with what it has.
                        body["tool_choice"] = "none"
                turn = _Round()
                async for output in self._round(client, body, turn):
                    yield output
                if not turn.calls or round_no == MAX_ROUNDS:
                    return
                calls = [turn.calls[i] for i in sorted(turn.calls)]
                for i, call in enumerate(calls):
                    call.id = call.id or f"call_{round_no}_{i}"
                messages.append(
                    {
                        "role": "assistant",
                        "content": turn.text or None,
                        "tool_calls": [
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            }
                            for c in calls
                        ],
                    }
                )
                for call in calls:
                    tool_name = names.get(call.name, call.name)
                    result = await ctx.use_tool(tool_name, _tool_input(call.arguments), call.id)
                    messages.append(
                        {"role": "tool", "tool_call_id": call.id, "content": _tool_content(result)}
                    )

    async def _round(
        self, client: httpx.AsyncClient, body: dict[str, Any], turn: _Round
    ) -> AsyncIterator[Output]:
        """One model request, retried while nothing of it has been shown."""
        url = settings.TANDEM_OPENAI_BASE_URL.rstrip("/") + "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        if settings.TANDEM_OPENAI_API_KEY:
            headers["Authorization"] = f"Bearer {settings.TANDEM_OPENAI_API_KEY}"
        attempt = 0
        while True:
            try:
                async with client.stream("POST", url, json=body, headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _raise_for_status(response)
                    async for output in _parse(response, turn):
                        turn.started = True
                        yield output
                return
            except httpx.TimeoutException as exc:
                failure = _Retryable(_describe_timeout(exc), timeout=True)
            except httpx.TransportError as exc:
                failure = _Retryable(f"Connection to the provider failed: {str(exc) or type(exc).__name__}")
            except _Retryable as exc:
                failure = exc
            if turn.started:
                code = "provider_timeout" if failure.timeout else "provider_error"
                raise AgentError(code, failure.message)
            attempt += 1
            if attempt > settings.TANDEM_OPENAI_MAX_RETRIES:
                code = "provider_timeout" if failure.timeout else "provider_unavailable"
                raise AgentError(code, f"{failure.message} (gave up after {attempt} attempts)")
            delay = float(settings.TANDEM_OPENAI_RETRY_BASE_SECONDS) * 2 ** (attempt - 1)
            if failure.retry_after is not None:
                delay = failure.retry_after
            yield Retrying(attempt, failure.message, datetime.now(UTC) + timedelta(seconds=delay))
            await asyncio.sleep(delay)
            # Fragments of a failed attempt must not leak into the next one.
            turn.text, turn.calls = "", {}


async def _parse(response: httpx.Response, turn: _Round) -> AsyncIterator[Output]:
    """Server-sent events to outputs; tool-call fragments and the text also go to
    ``turn``. An event the stream's end cuts off before its blank line is dropped, as the
    SSE rules say: it may be a chunk cut in half."""
    events = EventSource(response).aiter_sse()
    # aclosing: an abort (CancelledError) closes the event reader, and with it the body.
    async with aclosing(events):
        try:
            async for event in events:
                if not event.data:
                    continue  # an id:, retry: or event: alone carries nothing here
                if event.data.strip() == "[DONE]":
                    return
                for output in _chunk(event.data, turn):
                    yield output
        except SSEError as exc:  # a 200 that is not an event stream
            raise AgentError("provider_error", f"The provider did not send an event stream: {exc}") from exc


def _chunk(payload: str, turn: _Round) -> list[Output]:
    try:
        chunk = json.loads(payload)
    except ValueError as exc:
        raise AgentError("provider_error", f"The provider sent malformed JSON: {payload[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise AgentError("provider_error", f"The provider sent an unexpected chunk: {payload[:200]!r}")
    if chunk.get("error"):
        raise AgentError("provider_error", _error_message(chunk) or "The provider reported an error.")
    outputs: list[Output] = []
    choices = chunk.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    delta = choice.get("delta") or {}
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        outputs.append(ReasoningDelta(reasoning))
    content = delta.get("content")
    if isinstance(content, str) and content:
        turn.text += content
        outputs.append(TextDelta(content))
    for position, fragment in enumerate(delta.get("tool_calls") or []):
        call = turn.calls.setdefault(int(fragment.get("index", position)), _ToolCall())
        function = fragment.get("function") or {}
        # Some servers repeat id and name on every fragment; only arguments accumulate.
        call.id = call.id or fragment.get("id") or ""
        call.name = call.name or function.get("name") or ""
        call.arguments += function.get("arguments") or ""
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        outputs.append(
            Usage(
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                int(usage.get("total_tokens") or 0),
            )
        )
    return outputs


def _document_prompt(document: DocumentText) -> str:
    """The shared document as context: read once when the reply starts; ``doc_read``
    gives the model a fresh copy after anyone's edits."""
    about = (
        "The session has a shared document that its people write together (Markdown). "
        "Use doc_read to read it again and doc_edit to change it; the people are asked to approve "
        "every edit. "
    )
    if not document.text:
        return about + f"It is empty (version {document.version})."
    return about + f"Its text now (version {document.version}):\n<document>\n{document.text}\n</document>"


def _tool_input(raw: str) -> dict[str, Any]:
    """The model's arguments; never trusted. Anything but a JSON object goes to the runner
    as ``_invalid_arguments``, which fails the tool's schema check and reports the error
    to the user and, through the tool result, to the model."""
    if not raw.strip():
        return {}  # models often send "" for a tool without parameters
    try:
        value = json.loads(raw)
    except ValueError:
        return {"_invalid_arguments": raw}
    return value if isinstance(value, dict) else {"_invalid_arguments": raw}


def _tool_content(result: ToolResult) -> str:
    if result.ok:
        return json.dumps(result.output, default=str)
    error = result.error or ("The user rejected the tool call." if result.rejected else "The tool failed.")
    return json.dumps({"error": error})


def _raise_for_status(response: httpx.Response) -> NoReturn:
    status = response.status_code
    detail = _error_message(_json_or_none(response)) or response.reason_phrase or "error"
    if status == 429 or status >= 500:
        raise _Retryable(f"{status}: {detail}", _retry_after(response))
    raise AgentError("provider_error", f"{status}: {detail}")


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    return str(error or "")


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff is good enough
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _describe_timeout(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "Timed out connecting to the provider."
    if isinstance(exc, httpx.ReadTimeout):
        return f"The provider sent nothing for {settings.TANDEM_OPENAI_TIMEOUT:g} seconds."
    return "The provider timed out."
