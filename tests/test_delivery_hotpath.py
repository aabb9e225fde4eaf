"""The delivery hot path (events_app.streams: Connection.deliver / _flush / run): frames
to an idle stream are written from the loop's flusher, the ASGI send driven by hand,
without waking the stream's task; a write the server suspends (a client reading slowly)
is finished by the task, and everything delivered meanwhile waits behind it in order,
still bounded by the queue limit.

These run a real Connection behind the real consumers' writers on a stand-in for the
ASGI server's ``send`` that can pause writing as uvicorn does under flow control.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model

from events_app import fanout, groups
from events_app.consumers import SSEConsumer, StreamSocketConsumer
from events_app.metrics import SLOW_DISCONNECTS
from events_app.streams import Connection, StreamRequest
from events_app.types import Frame, TypeFilter, encode

SESSION = "ses_hotpath"


class Server:
    """uvicorn's ``send`` in miniature: while writing is paused, a send waits for the
    drain before it writes (uvicorn's ``flow.drain()``)."""

    def __init__(self) -> None:
        self.chunks: list[bytes | str] = []
        self.writers: list[asyncio.Task[Any] | None] = []  # the task each write ran in
        self.drained: asyncio.Future[None] | None = None
        self.waits = 0
        self.fail: BaseException | None = None

    def pause(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        if self.drained is not None:
            self.waits += 1
            await self.drained
        if self.fail is not None:
            raise self.fail
        self.writers.append(asyncio.current_task())
        self.chunks.append(message["body"] if "body" in message else message["text"])

    def envelopes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for chunk in self.chunks:
            if isinstance(chunk, str):
                out.append(orjson.loads(chunk))
            else:
                out += [orjson.loads(d) for d in re.findall(rb"^data: (.*)$", chunk, re.M)]
        return out

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.envelopes() if e["seq"] is not None]


def frame(seq: int | None, type_name: str = "bench.tick", session_id: str = SESSION) -> Frame:
    props: dict[str, Any] = {"n": seq}
    if type_name == "session.deleted":
        props = {"session_id": session_id}
    elif type_name.startswith("presence."):
        props = {"user": {"id": 1, "username": "alice"}, "connection_id": "con_x", "transport": "ws"}
    envelope = encode(
        seq=seq, session_id=session_id, type_name=type_name, time="2026-01-01T00:00:00Z",
        properties=props,
    )
    return Frame(seq, session_id, type_name, envelope)


class Stream:
    def __init__(self, conn: Connection, server: Server, task: asyncio.Task[str]) -> None:
        self.conn, self.server, self.task = conn, server, task


async def turn(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def open_stream() -> AsyncIterator[Any]:
    streams: list[Stream] = []

    async def make(transport: str = "sse", types: str | None = None) -> Stream:
        user = get_user_model()(pk=1, username="hotpath")
        request = StreamRequest(
            user, None, SESSION, transport, TypeFilter.parse(types), False, None, f"con_{len(streams)}"
        )
        server = Server()
        consumer: Any = SSEConsumer() if transport == "sse" else StreamSocketConsumer()
        consumer.base_send = server.send
        conn = Connection(request, consumer._write)
        conn.positions[SESSION] = 0
        task = asyncio.ensure_future(conn.run())
        conn.on_overflow = task.cancel  # as the SSE consumer does
        stream = Stream(conn, server, task)
        streams.append(stream)
        await turn()  # the task is now waiting, idle
        return stream

    yield make
    for s in streams:
        s.task.cancel()
        s.server.resume()
    await asyncio.gather(*(s.task for s in streams), return_exceptions=True)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_idle_stream_is_written_without_waking_its_task(open_stream: Any, transport: str) -> None:
    s = await open_stream(transport)
    for seq in range(1, 6):
        s.conn.deliver(frame(seq))
        await turn()
    assert s.server.seqs() == [1, 2, 3, 4, 5]
    # Written from the loop's flusher (a plain callback), not from the stream's task.
    assert s.server.writers == [None] * 5
    assert not s.task.done()


async def test_events_of_one_turn_leave_in_one_write(open_stream: Any) -> None:
    s = await open_stream("sse")
    for seq in range(1, 5):
        s.conn.deliver(frame(seq))
    await turn()
    assert len(s.server.chunks) == 1
    assert s.server.seqs() == [1, 2, 3, 4]


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_paused_write_mid_stream_keeps_order_without_loss_or_duplicates(
    open_stream: Any, transport: str
) -> None:
    s = await open_stream(transport)
    for seq in (1, 2):
        s.conn.deliver(frame(seq))
        await turn()
    s.server.pause()
    s.conn.deliver(frame(3))  # its write suspends: the task takes it over
    await turn()
    for seq in range(4, 9):  # queued behind the suspended write
        s.conn.deliver(frame(seq))
        await turn()
    assert s.server.seqs() == [1, 2]
    assert s.server.waits == 1
    s.server.resume()
    await turn(6)
    assert s.server.seqs() == list(range(1, 9))
    for seq in range(9, 12):  # idle again: back on the flusher
        s.conn.deliver(frame(seq))
        await turn()
    assert s.server.seqs() == list(range(1, 12))
    assert s.server.writers[-1] is None
    assert s.conn.positions[SESSION] == 11


async def test_overflow_while_a_write_is_suspended_disconnects_as_slow(
    open_stream: Any, settings: Any
) -> None:
    settings.TANDEM_STREAM_QUEUE = 5
    s = await open_stream("sse")
    before = SLOW_DISCONNECTS._value.get()
    s.server.pause()
    s.conn.deliver(frame(1))
    await turn()
    for seq in range(2, 9):
        s.conn.deliver(frame(seq))
    await turn()
    assert s.conn.overflowed and not s.conn.queue
    assert SLOW_DISCONNECTS._value.get() == before + 1
    with pytest.raises(asyncio.CancelledError):
        await s.task  # on_overflow cancelled it, mid-write
    assert s.server.chunks == []  # the suspended write never went out
    s.conn.deliver(frame(9))  # nothing more is taken
    assert not s.conn.queue


async def test_filters_drop_frames_but_move_the_position(open_stream: Any) -> None:
    s = await open_stream("sse", types="bench.*")
    s.conn.deliver(frame(1, "other.thing"))
    s.conn.deliver(frame(2, "bench.tick"))
    s.conn.deliver(frame(None, "presence.joined"))  # ephemeral and filtered: never queued
    assert len(s.conn.queue) == 2
    await turn()
    s.conn.deliver(frame(3, "other.thing"))
    s.conn.deliver(frame(4, "bench.other"))
    await turn()
    assert [(e["seq"], e["type"]) for e in s.server.envelopes()] == [(2, "bench.tick"), (4, "bench.other")]
    assert s.conn.positions[SESSION] == 4


async def test_heartbeat_is_sent_when_idle_after_fast_writes(open_stream: Any, settings: Any) -> None:
    settings.TANDEM_HEARTBEAT_SECONDS = 0.1
    s = await open_stream("sse")
    s.conn.deliver(frame(1))
    await turn()
    await asyncio.sleep(0.35)
    types = [e["type"] for e in s.server.envelopes()]
    assert types[0] == "bench.tick"
    assert types.count("server.heartbeat") >= 2


async def test_frames_before_a_session_deletion_go_out_then_the_stream_ends(open_stream: Any) -> None:
    s = await open_stream("ws")
    s.conn.deliver(frame(1))
    s.conn.deliver(frame(2))
    s.conn.deliver(frame(None, "session.deleted"))
    s.conn.deliver(frame(3))  # never sent: the stream has ended
    assert await asyncio.wait_for(s.task, 2) == "session_deleted"
    assert [e["type"] for e in s.server.envelopes()] == ["bench.tick", "bench.tick", "session.deleted"]


async def test_control_after_frames_in_one_turn_is_handled_in_order(open_stream: Any) -> None:
    s = await open_stream("sse")
    s.conn.deliver(frame(1))
    s.conn.control(groups.UserDisabled(1))
    s.conn.deliver(frame(2))
    assert await asyncio.wait_for(s.task, 2) == "user_disabled"
    assert s.server.seqs() == [1]


async def test_a_failed_write_ends_the_stream_with_its_error(open_stream: Any) -> None:
    s = await open_stream("ws")
    s.server.fail = OSError("client gone")
    s.conn.deliver(frame(1))
    with pytest.raises(OSError, match="client gone"):
        await asyncio.wait_for(s.task, 2)


async def test_a_gap_ends_the_stream(open_stream: Any) -> None:
    s = await open_stream("sse")
    s.conn.deliver(frame(1))
    s.conn.deliver(frame(3))
    assert await asyncio.wait_for(s.task, 2) == "gap"


async def test_many_streams_from_the_hub_get_everything_in_order(open_stream: Any) -> None:
    streams = [await open_stream("sse" if i % 2 else "ws") for i in range(20)]
    hub = fanout.get_hub()
    group = groups.session_group(SESSION)
    hub.groups[group] = {s.conn for s in streams}
    hub.presence[group] = set()
    try:
        for seq in range(1, 31):
            if seq == 10:
                streams[3].server.pause()
            if seq == 20:
                streams[3].server.resume()
            hub._deliver(group, frame(seq))
            if seq % 3 == 0:
                await turn()
        await turn(6)
    finally:
        hub.groups.pop(group, None)
        hub.presence.pop(group, None)
    for s in streams:
        assert s.server.seqs() == list(range(1, 31))


def test_type_filter_answers_are_kept_and_bounded() -> None:
    f = TypeFilter.parse("bench.*,a.b")
    assert f is not None
    assert f("bench.tick") and f("a.b") and f("server.heartbeat") and not f("a.c")
    assert f("bench.tick") and not f("a.c")  # from the memo, the same answers
    for i in range(TypeFilter.MEMO_SIZE * 2):
        assert f(f"bench.n{i}") and not f(f"x.n{i}")
    assert len(f._memo) <= TypeFilter.MEMO_SIZE
