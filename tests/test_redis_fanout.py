"""The fan-out hub on the real Redis pub/sub channel layer, in this process: one Redis
subscription per session however many local streams follow it, none once they leave,
gaps filled from the database, and order kept when committers race."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator

from events_app import fanout, groups
from events_app.services import publish
from events_app.types import Frame
from project import runtime
from project.asgi import application
from tests import runtime_control
from tests.conftest import REDIS_URL, token_for
from tests.streamutil import stream_groups

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


@pytest.fixture
async def live_loop(redis_layer: str) -> AsyncIterator[str]:
    """Make the test's event loop this process's main loop (as the ASGI server's loop is
    in production), so the outbox and the hub both run here on the Redis layer."""
    rt = runtime.bind(asyncio.get_running_loop())
    yield redis_layer
    await runtime_control.close(rt)  # its hub and outbox stop before Redis goes away


class Recorder:
    """A hub listener that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.controls: list[groups.Control] = []
        self.changed = asyncio.Event()

    def deliver(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.changed.set()

    def control(self, message: groups.Control) -> None:
        self.controls.append(message)
        self.changed.set()

    def seqs(self) -> list[int]:
        return [f.seq for f in self.frames if f.seq is not None]

    async def wait_for_seq(self, seq: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.seqs() or self.seqs()[-1] < seq:
                self.changed.clear()
                await self.changed.wait()


def group_channel(prefix: str, session_id: str) -> str:
    return f"{prefix}__group__{groups.session_group(session_id)}"


def numsub(channel: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.02)


apublish = database_sync_to_async(publish)


class SSEComm:
    """An SSE stream through the real ASGI application, in this process."""

    def __init__(self, session_id: str, user: Any) -> None:
        scope = {
            "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": f"/api/sessions/{session_id}/stream/", "raw_path": b"", "root_path": "",
            "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"authorization", f"Bearer {token_for(user)}".encode()), (b"host", b"127.0.0.1")],
        }
        self.comm = ApplicationCommunicator(application, scope)
        self.body = b""
        self.status: int | None = None

    async def open(self) -> dict[str, Any]:
        await self.comm.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await self.comm.receive_output(5)
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        assert self.status == 200
        await self.read_until(lambda events: any(e["type"] == "server.connected" for e in events))
        return self.events()[0]

    def events(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.body.split(b"\n\n"):
            for line in raw.split(b"\n"):
                if line.startswith(b"data: "):
                    out.append(orjson.loads(line[6:]))
        return out

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.events() if e["seq"] is not None]

    async def read_until(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.events()):
                message = await self.comm.receive_output(timeout)
                assert message["type"] == "http.response.body"
                self.body += message.get("body", b"")

    async def disconnect(self) -> None:
        await self.comm.send_input({"type": "http.disconnect"})
        await self.comm.wait(5)


# ---------------------------------------------------------------- tests


async def test_many_local_streams_of_one_session_share_one_redis_subscription_that_ends_with_the_last(
    live_loop: str, shared_session: Any, alice: Any, bob: Any, carol: Any
) -> None:
    sid = shared_session.id
    channel = group_channel(live_loop, sid)
    assert numsub(channel) == 0
    hub = fanout.get_hub()
    streams = [SSEComm(sid, user) for user in (alice, bob, carol) * 4]
    for stream in streams:
        await stream.open()
    group = groups.session_group(sid)
    assert len(hub.groups[group]) == len(streams) == 12
    assert list(stream_groups(hub)) == [group]
    assert numsub(channel) == 1  # one Redis subscription for twelve local streams

    frame = await apublish(sid, "task.progress", {"n": 1})
    for stream in streams:
        await stream.read_until(lambda events: frame.seq in [e["seq"] for e in events])
        assert stream.seqs() == [frame.seq]

    for stream in streams[:-1]:
        await stream.disconnect()
    assert len(hub.groups[group]) == 1
    assert numsub(channel) == 1  # still followed by one stream
    await streams[-1].disconnect()
    assert group not in hub.groups and not stream_groups(hub)
    await eventually(lambda: numsub(channel) == 0)


async def test_hub_fills_a_lost_event_from_the_database_and_delivers_in_order(
    live_loop: str, shared_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = shared_session.id
    hub = fanout.get_hub()
    recorder = Recorder()
    await hub.subscribe(groups.session_group(sid), recorder, sid)
    first = await apublish(sid, "task.progress", {"n": 1})
    await recorder.wait_for_seq(first.seq)

    # The next event is committed but its fan-out message is lost (as when Redis drops
    # it): the hub only ever hears of the one after.
    sent = fanout.send_frame
    monkeypatch.setattr(fanout, "send_frame", lambda group, frame: None)
    lost = await apublish(sid, "task.progress", {"n": 2})
    monkeypatch.setattr(fanout, "send_frame", sent)
    await asyncio.sleep(0.2)
    assert recorder.seqs() == [first.seq]  # really lost: nothing arrived

    after = await apublish(sid, "task.progress", {"n": 3})
    await recorder.wait_for_seq(after.seq)
    assert recorder.seqs() == [first.seq, lost.seq, after.seq]
    assert [orjson.loads(f.envelope)["properties"]["n"] for f in recorder.frames] == [1, 2, 3]
    assert recorder.frames[1].envelope == lost.envelope  # the stored envelope, unchanged
    await hub.unsubscribe(groups.session_group(sid), recorder)


def _publish_three(session_id: str) -> list[Frame]:
    from django.db import transaction

    from events_app.services import publish_many

    with transaction.atomic():
        return publish_many(session_id, [("task.progress", {"n": n}) for n in (1, 2, 3)])


async def test_events_committed_together_reach_the_hub_as_one_message_in_seq_order(
    live_loop: str, shared_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = shared_session.id
    hub = fanout.get_hub()
    recorder = Recorder()
    await hub.subscribe(groups.session_group(sid), recorder, sid)
    kinds: list[str] = []
    send = fanout.send_to_group

    def counting(group: str, message: Any) -> None:
        kinds.append(message["type"])
        send(group, message)

    monkeypatch.setattr(fanout, "send_to_group", counting)
    frames = await database_sync_to_async(_publish_three)(sid)
    await recorder.wait_for_seq(frames[-1].seq)
    assert kinds == [groups.EVENTS]  # one channel-layer message for the three
    assert recorder.seqs() == [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + 3))
    assert [f.envelope for f in recorder.frames] == [f.envelope for f in frames]
    await hub.unsubscribe(groups.session_group(sid), recorder)


async def test_a_lost_batch_is_filled_from_the_database_before_the_next_event(
    live_loop: str, shared_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = shared_session.id
    hub = fanout.get_hub()
    recorder = Recorder()
    await hub.subscribe(groups.session_group(sid), recorder, sid)
    first = await apublish(sid, "task.progress", {"n": 0})
    await recorder.wait_for_seq(first.seq)
    monkeypatch.setattr(fanout, "send_frames", lambda group, frames: None)
    lost = await database_sync_to_async(_publish_three)(sid)
    monkeypatch.undo()
    after = await apublish(sid, "task.progress", {"n": 4})
    await recorder.wait_for_seq(after.seq)
    assert recorder.seqs() == [first.seq, *(f.seq for f in lost), after.seq]
    assert [orjson.loads(f.envelope)["properties"]["n"] for f in recorder.frames] == [0, 1, 2, 3, 4]
    await hub.unsubscribe(groups.session_group(sid), recorder)


async def test_head_check_delivers_a_lost_last_event(
    live_loop: str, shared_session: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.TANDEM_HEARTBEAT_SECONDS = 0.2  # read when this loop's hub starts
    sid = shared_session.id
    hub = fanout.get_hub()
    recorder = Recorder()
    await hub.subscribe(groups.session_group(sid), recorder, sid)
    monkeypatch.setattr(fanout, "send_frame", lambda group, frame: None)
    lost = await apublish(sid, "task.progress", {"n": 1})
    # Nothing follows it, so no gap ever shows: only the periodic head check finds it.
    await recorder.wait_for_seq(lost.seq, timeout=5)
    assert recorder.seqs() == [lost.seq]
    await hub.unsubscribe(groups.session_group(sid), recorder)


async def test_events_from_racing_threads_reach_a_stream_in_seq_order(
    live_loop: str, shared_session: Any, alice: Any
) -> None:
    sid = shared_session.id
    stream = SSEComm(sid, alice)
    connected = await stream.open()
    head = connected["properties"]["last_seq"]
    hub = fanout.get_hub()
    recorder = Recorder()
    await hub.subscribe(groups.session_group(sid), recorder, sid)

    n_threads, per_thread = 4, 40
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        from django.db import connections

        try:
            barrier.wait(timeout=10)
            for i in range(per_thread):
                publish(sid, "task.progress", {"w": w, "i": i})
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [t.join(timeout=60) for t in threads])
    assert not errors, errors
    final = head + n_threads * per_thread
    await stream.read_until(lambda events: final in [e["seq"] for e in events])
    await recorder.wait_for_seq(final)
    expected = list(range(head + 1, final + 1))
    assert stream.seqs() == expected
    assert recorder.seqs() == expected
    # Per writer, its own events keep their order too.
    for w in range(n_threads):
        mine = [e["properties"]["i"] for e in stream.events() if e["properties"].get("w") == w]
        assert mine == list(range(per_thread))
    await hub.unsubscribe(groups.session_group(sid), recorder)
    await stream.disconnect()


async def test_a_burst_from_the_outbox_arrives_whole_and_in_order_per_group(live_loop: str) -> None:
    # The outbox sends everything queued in one pipeline of PUBLISHes (through the
    # pub/sub layer's own channel names and encoding): a plain layer subscriber must get
    # every message, each group's in the order sent.
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel("burst.")
    groups = [f"tandem.test.burst{i}" for i in range(3)]
    for group in groups:
        await layer.group_add(group, channel)
    try:
        for n in range(150):
            group = groups[n % 3]
            fanout.send_to_group(group, {"type": "tandem.control", "g": group, "action": "x", "n": n})
        got: dict[str, list[int]] = {g: [] for g in groups}
        async with asyncio.timeout(10):
            while sum(len(v) for v in got.values()) < 150:
                message = await layer.receive(channel)
                got[message["g"]].append(message["n"])
        for i, group in enumerate(groups):
            assert got[group] == list(range(i, 150, 3))
    finally:
        for group in groups:
            await layer.group_discard(group, channel)


async def test_every_control_reaches_the_listeners_of_its_group_as_the_same_typed_value(
    live_loop: str, shared_session: Any
) -> None:
    # Through the outbox, Redis and the hub, as the services and the agents pool send
    # them; one from a version this one does not know is skipped, and the hub goes on.
    sid = shared_session.id
    hub = fanout.get_hub()
    pool, user, other = Recorder(), Recorder(), Recorder()
    ours, theirs = groups.pool_group("host:1:aaaaaa"), groups.pool_group("host:2:bbbbbb")
    await hub.subscribe(ours, pool)
    await hub.subscribe(groups.user_group(4242), user)
    await hub.subscribe(theirs, other)
    to_pool: list[groups.Control] = [
        groups.Abort("msg_0123"), groups.PermissionAnswered("msg_0123", "per_0123"),
    ]
    to_user: list[groups.Control] = [
        groups.Join(session_id=sid, after=3), groups.Revoke(user_id=4242, session_id=sid),
        groups.UserDisabled(4242), groups.KeyRevoked(4242, "ab" * 32),
    ]
    fanout.send_to_group(ours, {"type": groups.CONTROL, "g": ours, "action": "later"})
    for control in to_pool:
        fanout.send_control(ours, control)
    for control in to_user:
        fanout.send_control(groups.user_group(4242), control)
    async with asyncio.timeout(5):
        while len(pool.controls) < len(to_pool) or len(user.controls) < len(to_user):  # noqa: ASYNC110 (listeners are plain callbacks)
            await asyncio.sleep(0.02)
    assert pool.controls == to_pool
    assert user.controls == to_user
    assert other.controls == []
    await hub.unsubscribe(ours, pool)
    await hub.unsubscribe(groups.user_group(4242), user)
    await hub.unsubscribe(theirs, other)
