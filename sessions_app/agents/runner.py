"""Runs one reply. The agent iterates in a task of its own and hands everything it
produces to the runner through one queue, so text, tools and permissions reach the
event log in the order the agent produced them. The runner coalesces deltas (about every
``TANDEM_COALESCE_MS`` or ``TANDEM_COALESCE_BYTES``), asks permission, runs tools off
the loop, and on the way out closes whatever is open — on success, failure or abort.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings
from django.utils import timezone

from events_app import groups
from events_app.types import iso
from project.db import off_loop
from sessions_app import doc as docs
from sessions_app import services
from sessions_app.agents import mcp_tools, registry, tools
from sessions_app.agents.base import (
    AgentError,
    DocumentText,
    Output,
    ReasoningDelta,
    ReplyContext,
    Retrying,
    TextDelta,
    ToolResult,
    Usage,
)
from sessions_app.models import Message, Part, PermissionRequest, new_id, new_part_id

log = logging.getLogger(__name__)
# One line when a reply starts and one when it ends, in whichever process runs it.
replies_log = logging.getLogger("tandem.replies")

_DONE = object()
# While waiting for an answer, the database is read this often in case the control
# message that says "answered" was lost (a Redis hiccup, say).
_PERMISSION_POLL_SECONDS = 1.0
# How long a cancelled asynchronous tool (an MCP call) may take to close its connection.
_CANCEL_GRACE_SECONDS = 5.0


@dataclass
class _OpenPart:
    id: str
    type: str
    index: int
    text: str = ""  # written so far
    pending: str = ""
    stored: bool = False  # its row and start event are written with its first words


@dataclass
class _ToolCall:
    name: str
    input: Any
    call_id: str | None
    result: asyncio.Future[ToolResult]


@dataclass
class _Usage:
    totals: dict[str, int] = field(default_factory=dict)

    def add(self, usage: Usage) -> None:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            self.totals[key] = self.totals.get(key, 0) + int(getattr(usage, key))


class Run:
    def __init__(
        self, session_id: str, message_id: str, agent_name: str, runner: str, *, abort_requested: bool = False
    ) -> None:
        self.session_id = session_id
        self.message_id = message_id
        self.agent_name = agent_name
        self.runner = runner
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.producer: asyncio.Task[None] | None = None
        self.parts: list[_OpenPart] = []  # text and reasoning parts, in order
        self.current: _OpenPart | None = None  # where the next delta of its type goes
        self.tool_parts = 0
        self.aborted = asyncio.Event()
        if abort_requested:  # asked before the claim: the claimed row says so
            self.aborted.set()
        self.lost = False  # another process ended this run (our lease lapsed)
        # Our own finish has started: from here its result, not a renewal, says whether
        # this process ended the reply (a renewal that reads the row after the finish
        # deleted it would otherwise call a completed reply lost).
        self.finishing = False
        self.answered: dict[str, asyncio.Event] = {}
        self.usage = _Usage()
        self.retrying = False
        self.last_flush = time.monotonic()
        self.asked_permission = False  # if not, the finish has no requests to close

    def control(self, message: groups.Abort | groups.PermissionAnswered) -> None:
        """From the pool, which listens for the aborts and answers of its replies."""
        if isinstance(message, groups.Abort):
            self.abort()
        elif isinstance(message, groups.PermissionAnswered):
            event = self.answered.get(message.permission_id)
            if event is not None:
                event.set()

    def abort(self, *, lost: bool = False) -> None:
        if lost and self.finishing:
            return
        self.lost = self.lost or lost
        self.aborted.set()
        if self.producer is not None:
            self.producer.cancel()

    async def _produce(self, ctx: ReplyContext) -> None:
        replies = None
        try:
            replies = registry.create(self.agent_name).reply(ctx)
            async for output in replies:
                await self.outputs.put(output)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            if not isinstance(exc, AgentError):
                log.exception("Agent %s failed in session %s", self.agent_name, self.session_id)
            await self.outputs.put(exc)
        finally:
            self.outputs.put_nowait(_DONE)
            if replies is not None:
                # Close the generator here, on this task, so its ``finally`` blocks
                # (an open HTTP stream, say) run now, not in the loop's finaliser.
                await _close(replies)

    async def _use_tool(self, tool: str, input: dict[str, Any], call_id: str | None = None) -> ToolResult:
        """What agents call as ``ctx.use_tool``: queued behind the agent's earlier
        outputs, so the tool's part comes after the text written before it."""
        result: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
        await self.outputs.put(_ToolCall(tool, input, call_id, result))
        return await result

    async def run(self) -> None:
        started = time.monotonic()
        replies_log.info(
            "reply started session=%s message=%s agent=%s runner=%s",
            self.session_id, self.message_id, self.agent_name, self.runner,
        )
        status, error = Message.Status.COMPLETED, None
        try:
            context = await off_loop(services.reply_context)(self.session_id, self.message_id)
            ctx = ReplyContext(
                self.session_id, self.message_id, context["history"], use_tool=self._use_tool,
                read_document=self._read_document,
            )
            self.producer = asyncio.get_running_loop().create_task(self._produce(ctx))
            # A task cancelled before its first step never runs its body, nor the
            # ``finally`` that says it is done: an abort that lands before the agent
            # starts would leave this loop waiting forever. A second _DONE is harmless.
            self.producer.add_done_callback(lambda _: self.outputs.put_nowait(_DONE))
            if self.aborted.is_set():
                self.producer.cancel()
            interval = settings.TANDEM_COALESCE_MS / 1000
            while True:
                try:
                    timeout = interval if self._has_pending() else None
                    item = await asyncio.wait_for(self.outputs.get(), timeout)
                except TimeoutError:
                    await self._flush()
                    continue
                if item is _DONE:
                    break
                if isinstance(item, AgentError):
                    status, error = Message.Status.ERROR, {"code": item.code, "message": item.message}
                elif isinstance(item, Exception):
                    status = Message.Status.ERROR
                    error = {"code": "agent_error", "message": str(item) or type(item).__name__}
                elif isinstance(item, _ToolCall):
                    outcome = await self._run_tool(item)
                    if not item.result.done():
                        item.result.set_result(outcome)
                else:
                    await self._apply(item)
            if self.aborted.is_set():
                status, error = Message.Status.CANCELLED, None
        except Exception as exc:  # a failure of ours, not the agent's: still end cleanly
            log.exception("Reply %s failed", self.message_id)
            status, error = Message.Status.ERROR, {"code": "internal_error", "message": str(exc)}
        finally:
            ended_here = False
            try:
                if not self.lost:
                    self.finishing = True
                    ended_here = await self._finish(status, error)
            finally:
                # Not ended here: another process ended it (our lease lapsed), or the
                # finish failed and the reaper will end it as interrupted.
                replies_log.info(
                    "reply ended session=%s message=%s agent=%s runner=%s status=%s%s duration=%.2fs",
                    self.session_id, self.message_id, self.agent_name, self.runner,
                    status if ended_here else "interrupted",
                    f" error={error['code']}" if error and ended_here else "",
                    time.monotonic() - started,
                )

    def _has_pending(self) -> bool:
        return any(p.pending for p in self.parts)

    async def _apply(self, output: Output) -> None:
        if self.retrying and not isinstance(output, Retrying):
            self.retrying = False
            await off_loop(services.set_session_status)(self.session_id, {"type": "busy"})
        if isinstance(output, (TextDelta, ReasoningDelta)):
            await self._add_text(output)
        elif isinstance(output, Usage):
            self.usage.add(output)
        elif isinstance(output, Retrying):
            self.retrying = True
            await self._flush()
            status = {
                "type": "retry", "attempt": output.attempt, "message": output.message,
                "next_at": iso(output.next_at),
            }
            await off_loop(services.set_session_status)(self.session_id, status)

    async def _add_text(self, output: TextDelta | ReasoningDelta) -> None:
        if not output.text:
            return
        part_type = Part.PartType.TEXT if isinstance(output, TextDelta) else Part.PartType.REASONING
        part = self.current if self.current and self.current.type == part_type else None
        first = part is None
        if part is None:
            await self._flush()
            part = _OpenPart(new_part_id(), part_type, self._next_index())
            self.parts.append(part)
            self.current = part
        part.pending += output.text
        due = time.monotonic() - self.last_flush >= settings.TANDEM_COALESCE_MS / 1000
        # A part's first words go out at once (time to first token is what a reader
        # feels), with the part's start — unless the agent has already produced more,
        # which then goes with them (a short reply may be written whole by the finish).
        # What follows is coalesced.
        if (first and self.outputs.empty()) or due or len(part.pending.encode()) >= settings.TANDEM_COALESCE_BYTES:
            await self._flush()

    def _next_index(self) -> int:
        return len(self.parts) + self.tool_parts

    def _take_writes(self) -> list[services.TextWrite]:
        """The coalesced text not written yet, marked as written."""
        writes = []
        for part in self.parts:
            if part.pending or not part.stored:
                delta, part.pending = part.pending, ""
                part.text += delta
                writes.append(services.TextWrite(
                    part.id, part.type, part.text, delta, None if part.stored else part.index
                ))
                part.stored = True
        return writes

    async def _flush(self) -> None:
        self.last_flush = time.monotonic()
        writes = self._take_writes()
        if writes:
            await off_loop(services.write_parts)(self.message_id, self.session_id, writes)

    async def _read_document(self) -> DocumentText:
        state = await off_loop(docs.read_doc)(self.session_id)
        return DocumentText(state.text, state.version)

    # ------------------------------------------------------------ tools

    async def _run_tool(self, call: _ToolCall) -> ToolResult:
        """Part, permission, execution and status of one tool call."""
        await self._flush()
        if self.aborted.is_set():
            return ToolResult(ok=False, error="The reply was aborted.")
        call_id = call.call_id or new_id("call")
        shown_input = call.input if _is_json(call.input) else repr(call.input)
        part = await off_loop(services.start_tool_part)(
            self.message_id, self.session_id, self._next_index(), call.name, call_id, shown_input
        )
        self.tool_parts += 1
        self.current = None  # text after the tool starts a new part below it

        async def fail(message: str, *, rejected: bool = False) -> ToolResult:
            await off_loop(services.set_tool_state)(
                part.id, self.session_id, self.message_id, {"status": "error", "error": message}
            )
            return ToolResult(ok=False, error=message, rejected=rejected)

        tool = tools.get(call.name) or mcp_tools.get(call.name)
        if tool is None:
            return await fail(f"There is no tool named {call.name!r}.")
        try:
            checked = tool.check_input(call.input)
        except tools.ToolFailed as exc:
            return await fail(f"Invalid input: {exc}")
        if tool.needs_permission:
            self.asked_permission = True
            permission = await off_loop(services.request_permission)(
                self.session_id, self.message_id, call_id, tool.name, checked
            )
            decided = await self._await_answer(permission)
            if decided is None:  # aborted: the finish closes the part and the request
                return ToolResult(ok=False, error="The reply was aborted.")
            if decided.status != PermissionRequest.Status.APPROVED:
                why = "expired" if decided.status == PermissionRequest.Status.EXPIRED else "rejected"
                detail = f": {decided.reason}" if decided.reason else "."
                return await fail(f"Permission {why}{detail}", rejected=True)
        await off_loop(services.set_tool_state)(
            part.id, self.session_id, self.message_id, {"status": "running"}
        )
        try:
            output = await self._execute(tool, checked)
        except tools.ToolFailed as exc:
            return await fail(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Tool %s failed", tool.name)
            return await fail("The tool failed.")
        if output is _ABORTED:
            return ToolResult(ok=False, error="The reply was aborted.")
        await off_loop(services.set_tool_state)(
            part.id, self.session_id, self.message_id, {"status": "completed", "output": output}
        )
        return ToolResult(ok=True, output=output)

    async def _execute(self, tool: tools.Tool, checked: dict[str, Any]) -> Any:
        work: asyncio.Future[Any]
        if tool.arun is not None:
            work = asyncio.ensure_future(tool.arun(checked))
        elif tool.session_run is not None:
            # It reads and writes the session's rows: off_loop closes its connection after
            # the call and lets shutdown wait for it.
            work = asyncio.ensure_future(off_loop(tool.session_run)(self.session_id, checked))
        else:
            work = asyncio.ensure_future(asyncio.to_thread(tool.run, checked))
        timeout = tool.timeout or settings.TANDEM_TOOL_TIMEOUT
        stop = asyncio.ensure_future(self.aborted.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work in done:
            output = work.result()
            if not _is_json(output):
                raise tools.ToolFailed("The tool's result is not JSON.")
            return output
        if tool.arun is not None:
            # Cancelled, the call closes its connection (and ends a stdio server's
            # process); waited for, boundedly, so no process outlives its reply.
            work.cancel()
            await asyncio.wait([work], timeout=_CANCEL_GRACE_SECONDS)
        # A thread cannot be stopped; the calculator bounds its own work, so a timed-out
        # call ends soon on its own. Nobody waits for it.
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self.aborted.is_set():
            return _ABORTED
        raise tools.ToolFailed(f"The tool took longer than {timeout:g} s.")

    async def _await_answer(self, permission: PermissionRequest) -> PermissionRequest | None:
        """The request once it is answered or expired; None if the reply is aborted."""
        answered = self.answered.setdefault(permission.id, asyncio.Event())
        try:
            while True:
                if self.aborted.is_set():
                    return None
                current = await off_loop(services.permission_state)(permission.id)
                if current.status != PermissionRequest.Status.PENDING:
                    return current
                left = (current.expires_at - timezone.now()).total_seconds()
                if left <= 0:
                    current = await off_loop(services.expire_permission)(permission.id)
                    if current.status != PermissionRequest.Status.PENDING:
                        return current
                    continue
                answered.clear()
                waits = [asyncio.ensure_future(answered.wait()), asyncio.ensure_future(self.aborted.wait())]
                try:
                    await asyncio.wait(
                        waits, timeout=min(left, _PERMISSION_POLL_SECONDS),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for waiter in waits:
                        waiter.cancel()
        finally:
            self.answered.pop(permission.id, None)

    async def _finish(self, status: str, error: dict[str, str] | None) -> bool:
        """End the reply; False when this process no longer held it."""
        # Pending text goes out as a last delta, even on abort: the deltas of a part must
        # add up to its final text. It is written by the finish's own transaction.
        writes = self._take_writes()
        return await off_loop(services.finish_reply)(
            self.session_id, self.message_id, runner=self.runner, status=status, error=error,
            text_parts=[(p.id, p.text) for p in self.parts],
            usage=self.usage.totals or None, writes=writes, asked_permission=self.asked_permission,
        )


_ABORTED = object()


async def _close(replies: Any) -> None:
    try:
        await replies.aclose()
    except (Exception, asyncio.CancelledError):  # it failed already; that was reported
        pass


def _is_json(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True
