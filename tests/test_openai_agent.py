"""The ``openai`` agent against a real local HTTP server that streams like the OpenAI API
(``tests/fake_openai.py``): every quirk of the stream, tools, retries, timeouts, abort."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sessions_app.agents.base import (
    AgentError,
    Output,
    ReasoningDelta,
    ReplyContext,
    Retrying,
    TextDelta,
    ToolResult,
    Usage,
)
from sessions_app.agents.openai import MAX_ROUNDS, OpenAIAgent
from sessions_app.agents.tools import TOOLS, ToolFailed
from tests.conftest import free_port
from tests.fake_openai import (  # noqa: F401  (fake_openai is a fixture)
    FakeOpenAI,
    Hang,
    Scripted,
    chunk,
    error,
    fake_openai,
    stream,
    text_chunks,
    tool_call,
)

HISTORY = [
    {"role": "user", "text": "What is 2+2?"},
    {"role": "assistant", "text": ""},
    {"role": "assistant", "text": "Let me think."},
    {"role": "user", "text": "And the time?"},
]


class ToolUser:
    """Records calls and answers like the runner: the real schema check, then a canned
    output (or failure) per tool."""

    def __init__(self, outputs: dict[str, ToolResult] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.outputs = outputs or {}

    async def __call__(self, tool: str, input: dict[str, Any], call_id: str | None = None) -> ToolResult:
        self.calls.append((tool, input, call_id))
        known = TOOLS.get(tool)
        if known is None:
            return ToolResult(ok=False, error=f"Unknown tool: {tool}.")
        try:
            known.check_input(input)
        except ToolFailed as exc:
            return ToolResult(ok=False, error=str(exc))
        return self.outputs.get(tool, ToolResult(ok=True, output=f"{tool} ran"))


def context(tools: ToolUser | None = None, history: list[dict[str, Any]] | None = None) -> ReplyContext:
    return ReplyContext(
        session_id="ses_x",
        message_id="msg_x",
        history=HISTORY if history is None else history,
        use_tool=tools or ToolUser(),
    )


async def collect(ctx: ReplyContext) -> list[Output]:
    return [output async for output in OpenAIAgent().reply(ctx)]


async def collect_error(ctx: ReplyContext) -> tuple[list[Output], AgentError]:
    outputs: list[Output] = []
    with pytest.raises(AgentError) as caught:
        async for output in OpenAIAgent().reply(ctx):
            outputs.append(output)
    return outputs, caught.value


def text_of(outputs: list[Output]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, TextDelta))


# ---------------------------------------------------------------- the stream


async def test_text_deltas_concatenate_to_the_full_reply(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(*text_chunks("Hel", "lo, ", "wor", "ld! ✓")))
    outputs = await collect(context())
    assert outputs == [TextDelta("Hel"), TextDelta("lo, "), TextDelta("wor"), TextDelta("ld! ✓")]
    assert text_of(outputs) == "Hello, world! ✓"


async def test_request_carries_model_key_stream_options_history_and_every_tool(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(stream(*text_chunks("ok")))
    await collect(context())
    [body] = fake_openai.requests
    assert fake_openai.headers[0]["authorization"] == "Bearer sk-test"
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    system, *rest = body["messages"]
    assert system["role"] == "system" and system["content"]
    assert rest == [  # oldest first, the empty assistant text skipped
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Let me think."},
        {"role": "user", "content": "And the time?"},
    ]
    assert body["tools"] == [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in TOOLS.values()
    ]
    assert "tool_choice" not in body


async def test_no_authorization_header_without_a_key(fake_openai: FakeOpenAI, settings: Any) -> None:
    settings.TANDEM_OPENAI_API_KEY = ""
    fake_openai.script(stream(*text_chunks("ok")))
    await collect(context())
    assert "authorization" not in fake_openai.headers[0]


async def test_role_only_first_chunk_yields_nothing(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"role": "assistant", "content": ""}), chunk({"role": "assistant"}), chunk({"content": "Hi"})))
    assert await collect(context()) == [TextDelta("Hi")]


async def test_comment_lines_and_other_fields_are_ignored(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream(": OPENROUTER PROCESSING", "", chunk({"content": "A"}), ": keep-alive", "", "event: message", chunk({"content": "B"}))
    )
    assert text_of(await collect(context())) == "AB"


async def test_crlf_line_endings_are_understood(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(": hello", "", *text_chunks("one ", "two"), newline="\r\n"))
    assert await collect(context()) == [TextDelta("one "), TextDelta("two")]


async def test_a_stream_without_done_ends_at_close(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(*text_chunks("no", " done"), done=False))
    assert text_of(await collect(context())) == "no done"


async def test_reasoning_content_and_reasoning_become_reasoning_deltas(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream(
            chunk({"role": "assistant"}),
            chunk({"reasoning_content": "Think"}),
            chunk({"reasoning": "ing..."}),
            chunk({"content": "Answer"}),
        )
    )
    assert await collect(context()) == [ReasoningDelta("Think"), ReasoningDelta("ing..."), TextDelta("Answer")]


async def test_usage_chunk_with_empty_choices_is_reported(fake_openai: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    fake_openai.script(stream(*text_chunks("Hi"), chunk(usage=usage, choices=False)))
    outputs = await collect(context())
    assert outputs == [TextDelta("Hi"), Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15)]


async def test_a_mid_stream_error_is_a_provider_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"content": "Part"}), {"error": {"message": "Overloaded mid-flight", "type": "server_error"}}))
    outputs, exc = await collect_error(context())
    assert outputs == [TextDelta("Part")]
    assert exc.code == "provider_error" and "Overloaded mid-flight" in exc.message
    assert len(fake_openai.requests) == 1


async def test_malformed_json_in_a_data_line_is_a_provider_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"content": "ok"}), 'data: {"choices": [', ""))
    outputs, exc = await collect_error(context())
    assert outputs == [TextDelta("ok")]
    assert exc.code == "provider_error" and "malformed JSON" in exc.message


async def test_bare_cr_line_endings_are_understood(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(": hello", "", *text_chunks("one ", "two"), newline="\r"))
    assert await collect(context()) == [TextDelta("one "), TextDelta("two")]


async def test_data_over_several_lines_is_one_chunk(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream('data: {"choices": [{"delta":', 'data:{"content": "joined"}}]}', ""))
    assert await collect(context()) == [TextDelta("joined")]


async def test_lines_without_a_colon_empty_data_and_unknown_fields_are_ignored(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream("garbage without a colon", "id: 7", "retry: soon", "", "data:", "", "x-custom: 1", chunk({"content": "ok"}))
    )
    assert await collect(context()) == [TextDelta("ok")]


async def test_a_json_value_that_is_not_an_object_is_a_provider_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"content": "ok"}), "data: [1, 2]", ""))
    outputs, exc = await collect_error(context())
    assert outputs == [TextDelta("ok")]
    assert exc.code == "provider_error" and "unexpected chunk" in exc.message


async def test_an_event_cut_off_by_the_end_of_the_stream_is_dropped(fake_openai: FakeOpenAI) -> None:
    # The last event has no blank line after it: it may be half a chunk, so it is not read.
    fake_openai.script(stream(chunk({"content": "kept"}), 'data: {"choices": [{"delta": {"content": "cut"}}]}', done=False))
    assert await collect(context()) == [TextDelta("kept")]


async def test_a_200_that_is_not_an_event_stream_is_a_provider_error_without_retry(fake_openai: FakeOpenAI) -> None:
    body = json.dumps(chunk({"content": "whole"})).encode()
    fake_openai.script(Scripted(status=200, headers={"Content-Type": "application/json"}, body=body))
    outputs, exc = await collect_error(context())
    assert outputs == []
    assert exc.code == "provider_error" and "event stream" in exc.message and "application/json" in exc.message
    assert len(fake_openai.requests) == 1


# ---------------------------------------------------------------- tools


async def test_tool_call_fragments_are_joined_by_index_and_results_sent_back(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream(
            chunk({"role": "assistant", "content": None}),
            tool_call(0, id="call_calc", name="calculator"),
            tool_call(0, arguments='{"expre'),
            tool_call(1, id="call_time", name="time"),
            tool_call(0, arguments='ssion": "2*'),
            tool_call(1, arguments="{}"),
            tool_call(0, arguments='(3+4)"}'),
            chunk(finish_reason="tool_calls"),
        ),
        stream(*text_chunks("It is 14.")),
    )
    tools = ToolUser({"calculator": ToolResult(ok=True, output=14), "time": ToolResult(ok=False, error="Clock broke.")})
    outputs = await collect(context(tools))

    assert tools.calls == [
        ("calculator", {"expression": "2*(3+4)"}, "call_calc"),
        ("time", {}, "call_time"),
    ]
    assert text_of(outputs) == "It is 14."
    first, second = fake_openai.requests
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][len(first["messages"]):] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_calc", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2*(3+4)"}'}},
                {"id": "call_time", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_calc", "content": "14"},
        {"role": "tool", "tool_call_id": "call_time", "content": json.dumps({"error": "Clock broke."})},
    ]


async def test_text_before_tool_calls_is_shown_and_kept_in_the_conversation(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream(chunk({"content": "Checking. "}), tool_call(0, id="c1", name="time", arguments=""), chunk(finish_reason="tool_calls")),
        stream(*text_chunks("Done.")),
    )
    tools = ToolUser()
    outputs = await collect(context(tools))
    assert text_of(outputs) == "Checking. Done."
    assert tools.calls == [("time", {}, "c1")]  # empty arguments mean no arguments
    assistant = fake_openai.requests[1]["messages"][-2]
    assert assistant["content"] == "Checking. "


async def test_malformed_tool_arguments_reach_the_runner_as_invalid_and_the_conversation_continues(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(
        stream(
            tool_call(0, id="call_bad", name="calculator", arguments='{"expression": "1+'),
            tool_call(1, id="call_list", name="calculator", arguments="[1, 2]"),
            chunk(finish_reason="tool_calls"),
        ),
        stream(*text_chunks("Sorry, let me fix that.")),
    )
    tools = ToolUser()
    outputs = await collect(context(tools))

    assert tools.calls == [
        ("calculator", {"_invalid_arguments": '{"expression": "1+'}, "call_bad"),
        ("calculator", {"_invalid_arguments": "[1, 2]"}, "call_list"),
    ]
    results = [m for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"]
    assert [json.loads(r["content"]) for r in results] == [
        {"error": "Unknown argument(s): _invalid_arguments."},
        {"error": "Unknown argument(s): _invalid_arguments."},
    ]
    assert text_of(outputs) == "Sorry, let me fix that."


async def test_an_unknown_tool_goes_to_the_runner_which_reports_it(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        stream(tool_call(0, id="c1", name="rm_rf", arguments="{}"), chunk(finish_reason="tool_calls")),
        stream(*text_chunks("Never mind.")),
    )
    tools = ToolUser()
    await collect(context(tools))
    assert tools.calls == [("rm_rf", {}, "c1")]
    assert fake_openai.requests[1]["messages"][-1]["content"] == json.dumps({"error": "Unknown tool: rm_rf."})


async def test_tool_rounds_are_capped_and_the_last_round_may_not_call_tools(fake_openai: FakeOpenAI) -> None:
    looping = [
        stream(tool_call(0, id=f"c{i}", name="time", arguments="{}"), chunk(finish_reason="tool_calls"))
        for i in range(MAX_ROUNDS)
    ]
    fake_openai.script(*looping)
    tools = ToolUser()
    await collect(context(tools))
    assert len(fake_openai.requests) == MAX_ROUNDS
    assert len(tools.calls) == MAX_ROUNDS - 1
    assert fake_openai.requests[-1]["tool_choice"] == "none"
    assert all("tool_choice" not in r for r in fake_openai.requests[:-1])


# ---------------------------------------------------------------- retries and failures


async def test_a_500_is_retried_with_numbered_notices_then_succeeds(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(error(500, "boom"), error(503, "busy"), stream(*text_chunks("Finally")))
    before = datetime.now(UTC)
    outputs = await collect(context())

    retries = [o for o in outputs if isinstance(o, Retrying)]
    assert [r.attempt for r in retries] == [1, 2]
    assert "500" in retries[0].message and "boom" in retries[0].message
    assert "503" in retries[1].message
    for r in retries:
        assert r.next_at.tzinfo is not None and before <= r.next_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert outputs[-1] == TextDelta("Finally")
    assert len(fake_openai.requests) == 3
    assert fake_openai.requests[0] == fake_openai.requests[2]


async def test_a_429_retry_after_is_honoured(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(error(429, "Rate limit reached", headers={"Retry-After": "0.3"}), stream(*text_chunks("ok")))
    before, started = datetime.now(UTC), time.monotonic()
    outputs = await collect(context())
    [retry] = [o for o in outputs if isinstance(o, Retrying)]
    assert retry.attempt == 1 and "429" in retry.message and "Rate limit" in retry.message
    # The provider's wait, not the 0.01 s base backoff.
    assert retry.next_at - before >= timedelta(seconds=0.3)
    assert time.monotonic() - started >= 0.3
    assert text_of(outputs) == "ok"


async def test_retries_exhausted_is_provider_unavailable(fake_openai: FakeOpenAI, settings: Any) -> None:
    settings.TANDEM_OPENAI_MAX_RETRIES = 2
    fake_openai.script(error(502, "bad gateway"), error(502, "bad gateway"), error(502, "bad gateway"))
    outputs, exc = await collect_error(context())
    assert exc.code == "provider_unavailable" and "502" in exc.message
    assert [o.attempt for o in outputs if isinstance(o, Retrying)] == [1, 2]
    assert len(fake_openai.requests) == 3


async def test_no_retries_configured_fails_at_once(fake_openai: FakeOpenAI, settings: Any) -> None:
    settings.TANDEM_OPENAI_MAX_RETRIES = 0
    fake_openai.script(error(500, "boom"))
    outputs, exc = await collect_error(context())
    assert outputs == [] and exc.code == "provider_unavailable"
    assert len(fake_openai.requests) == 1


async def test_connection_refused_is_retried_then_provider_unavailable(settings: Any) -> None:
    settings.TANDEM_OPENAI_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    settings.TANDEM_OPENAI_TIMEOUT = 0.5
    settings.TANDEM_OPENAI_MAX_RETRIES = 1
    settings.TANDEM_OPENAI_RETRY_BASE_SECONDS = 0.01
    outputs, exc = await collect_error(context())
    assert [o.attempt for o in outputs if isinstance(o, Retrying)] == [1]
    assert exc.code == "provider_unavailable"


async def test_a_400_is_a_provider_error_without_retry(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(error(400, "Invalid 'messages': too long."), stream(*text_chunks("never")))
    outputs, exc = await collect_error(context())
    assert outputs == []
    assert exc.code == "provider_error"
    assert exc.message == "400: Invalid 'messages': too long."
    assert len(fake_openai.requests) == 1


async def test_a_401_without_a_json_body_is_a_provider_error(fake_openai: FakeOpenAI) -> None:
    from tests.fake_openai import Scripted

    fake_openai.script(Scripted(status=401, headers={"Content-Type": "text/plain"}, body=b"nope"))
    _, exc = await collect_error(context())
    assert exc.code == "provider_error" and exc.message.startswith("401")


async def test_a_stall_after_tokens_is_provider_timeout_without_retry(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"role": "assistant"}), chunk({"content": "Half"}), Hang(10), done=False))
    outputs, exc = await collect_error(context())
    assert outputs == [TextDelta("Half")]
    assert exc.code == "provider_timeout"
    assert len(fake_openai.requests) == 1


async def test_a_stall_before_the_first_token_is_retried(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"role": "assistant"}), Hang(10), done=False), stream(*text_chunks("Back")))
    outputs = await collect(context())
    [retry] = [o for o in outputs if isinstance(o, Retrying)]
    assert retry.attempt == 1
    assert outputs[-1] == TextDelta("Back")


async def test_stalls_that_exhaust_retries_are_provider_timeout(fake_openai: FakeOpenAI, settings: Any) -> None:
    settings.TANDEM_OPENAI_MAX_RETRIES = 1
    fake_openai.script(stream(Hang(10), done=False), stream(Hang(10), done=False))
    outputs, exc = await collect_error(context())
    assert [o.attempt for o in outputs if isinstance(o, Retrying)] == [1]
    assert exc.code == "provider_timeout"


# ---------------------------------------------------------------- abort


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def test_cancellation_propagates_and_closes_the_upstream_connection(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stream(chunk({"content": "Streaming"}), Hang(30), done=False))
    outputs: list[Output] = []

    async def consume() -> None:
        async for output in OpenAIAgent().reply(context()):
            outputs.append(output)

    task = asyncio.get_running_loop().create_task(consume())
    await wait_for(lambda: outputs)
    assert fake_openai.disconnects == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: fake_openai.disconnects == 1)
    assert outputs == [TextDelta("Streaming")]
