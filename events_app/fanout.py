"""Fan-out: from a committed event to every local connection, through the channel layer.

Sending side — ``send_frame`` / ``send_control`` put a message on this process's *outbox*,
a FIFO drained by one task on the main loop, so events leave in the order they committed
in this process (``group_send`` calls racing each other would reorder them); each round
trip to the channel layer carries everything queued meanwhile.

Receiving side — one ``Hub`` per process (per runtime) holds **one** channel-layer
channel and adds it to a session's group when the first local connection of that session
opens, so a process holds one subscription per session however many clients it serves.
For each event the hub makes one ``Frame`` (encoded once) and hands the same object to
every local listener.

The hub also guarantees that listeners see a session's events contiguous and in order:
it remembers the last seq it passed on per session, drops duplicates, and fills a gap
(a message lost by Redis, or two committers whose sends crossed) from the database before
passing the later event on. A periodic head check catches a lost *last* event.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, TypeVar

from channels.layers import get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from redis.exceptions import RedisError

from events_app import groups
from events_app.metrics import DELIVERY_LAG, EVENTS_DELIVERED
from events_app.types import Frame
from project import runtime, thirdparty
from project.batch import Batcher
from project.db import off_loop

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long the hub waits for the channel layer (Redis) to take a subscription before it
# counts Redis as unreachable: a hung Redis (docs/API.md, "hung for longer than 2 s")
# must not hold an opening stream, or the hub's lock on its group, for good.
LAYER_TIMEOUT = 2.0


class Unreachable(ConnectionError):
    """The channel layer (Redis) failed or did not answer within ``LAYER_TIMEOUT`` while
    the hub joined or left a group. A ConnectionError: whoever treats an OSError as Redis
    being away needs nothing new."""


async def _layer_call(call: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(LAYER_TIMEOUT):
            return await call
    except (RedisError, OSError, TimeoutError) as exc:
        if isinstance(exc, Unreachable):
            raise
        raise Unreachable(f"channel layer unreachable: {exc!r}") from exc

# ---------------------------------------------------------------- sending side


class _Outbox:
    """One FIFO per process, drained by one task that takes everything queued at once and
    sends it in one round trip (a Redis pipeline of PUBLISHes, in order), so events leave
    in the order they committed in this process. channels-redis sends one PUBLISH at a
    time under a lock, so one message per round trip made every event wait for the round
    trips of all the events before it: a worker streaming a thousand replies fell seconds
    behind (docs/PERFORMANCE.md)."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.queue: deque[tuple[str, Mapping[str, Any]]] = deque()
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task = rt.spawn(self._drain(), name="tandem-outbox")

    def put(self, group: str, message: Mapping[str, Any]) -> None:
        self.queue.append((group, message))
        self.idle.clear()
        self.wakeup.set()

    async def _drain(self) -> None:
        while True:
            if not self.queue:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = list(self.queue)
            self.queue.clear()
            for attempt in range(4):
                try:
                    await _send_batch(batch)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if attempt == 3:
                        # The events are in the database: readers recover them through
                        # the hub's gap fill and head check.
                        log.exception("Dropped %d fan-out messages after retries", len(batch))
                    else:
                        await asyncio.sleep(0.1 * 2**attempt)

    async def drained(self) -> None:
        await self.idle.wait()


async def _send_batch(batch: list[tuple[str, Mapping[str, Any]]]) -> None:
    layer = get_channel_layer()
    if isinstance(layer, RedisPubSubChannelLayer):
        await thirdparty.publish_group_batch(layer, batch)
        return
    for group, message in batch:
        await layer.group_send(group, message)


OUTBOX = runtime.Component("outbox", _Outbox)


def _enqueue(group: str, message: Mapping[str, Any]) -> None:
    OUTBOX.get().put(group, message)


async def drained() -> None:
    """Every message put on this loop's outbox so far has been sent (or given up on)."""
    outbox = OUTBOX.find(runtime.current())
    if outbox is not None:
        await outbox.drained()


def send_to_group(group: str, message: Mapping[str, Any]) -> None:
    """Thread-safe, non-blocking, order-preserving. Messages are made by ``groups``."""
    runtime.call_soon(_enqueue, group, message)


def send_frame(group: str, frame: Frame) -> None:
    send_to_group(group, groups.encode_event(group, frame, time.time()))


def send_frames(group: str, frames: list[Frame]) -> None:
    """``send_frame`` for several events of one session group that committed together,
    in order: one message for the lot (one ``PUBLISH``, one read and one decode in every
    process's hub, instead of one per event), and one wake-up of the main loop."""
    if len(frames) == 1:
        send_frame(group, frames[0])
        return
    send_to_group(group, groups.encode_events(group, frames, time.time()))


def send_control(group: str, control: groups.Control) -> None:
    send_to_group(group, groups.encode_control(group, control))


# ---------------------------------------------------------------- receiving side


class Listener(Protocol):
    wants_presence: bool

    def deliver(self, frame: Frame) -> None: ...

    def control(self, message: groups.Control) -> None: ...


def heads(session_ids: list[str]) -> dict[str, int]:
    from sessions_app.models import Session

    return dict(Session.objects.filter(pk__in=session_ids).values_list("id", "last_seq"))


def _heads_in_order(session_ids: list[str]) -> list[int]:
    found = heads(sorted(set(session_ids)))
    return [found.get(sid, 0) for sid in session_ids]


class Hub:
    def __init__(self, rt: runtime.Runtime) -> None:
        self.runtime = rt
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.groups: dict[str, set[Listener]] = {}
        # The members of each group that take presence frames: a large audience that
        # filters presence out is not offered N joins for N connections.
        self.presence: dict[str, set[Listener]] = {}
        self.heads: dict[str, int] = {}  # session group -> last seq passed on
        self.group_session: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: defaultdict[str, int] = defaultdict(int)
        self._start_lock = asyncio.Lock()
        # The heads of groups being joined for the first time: a burst of opens across
        # many sessions reads them in one database call, not one each.
        self._head_reads: Batcher[str, int] = Batcher("hub-heads", off_loop(_heads_in_order), limit=500)

    async def _ensure_started(self) -> str:
        if self.channel is None:
            async with self._start_lock:
                if self.channel is None:
                    channel = await _layer_call(self.layer.new_channel(groups.HUB_CHANNEL_PREFIX))
                    self.runtime.spawn(self._read(channel), name="tandem-hub-reader")
                    self.runtime.spawn(self._check_heads(), name="tandem-hub-heads")
                    self.channel = channel
        return self.channel

    async def subscribe(self, group: str, listener: Listener, session_id: str | None = None) -> None:
        """Raises ``Unreachable`` when Redis fails or hangs; the listener is then in no
        group, and a later call starts over."""
        channel = await self._ensure_started()
        async with self._group_lock(group):
            members = self.groups.get(group)
            if members is None:
                try:
                    await _layer_call(self.layer.group_add(group, channel))
                except Unreachable:
                    # The layer notes the membership before it asks Redis: take it back
                    # (no Redis call, since it never subscribed).
                    with contextlib.suppress(Exception):
                        await _layer_call(self.layer.group_discard(group, channel))
                    raise
                if session_id is not None:
                    # Read after group_add: anything committed before is at or below
                    # this head, anything after will arrive through the group.
                    self.heads[group] = await self._head_reads.submit(session_id)
                    self.group_session[group] = session_id
                members = self.groups[group] = set()
                self.presence[group] = set()
            members.add(listener)
            if getattr(listener, "wants_presence", True):
                self.presence[group].add(listener)

    async def unsubscribe(self, group: str, listener: Listener) -> None:
        async with self._group_lock(group):
            members = self.groups.get(group)
            if members is None or listener not in members:
                return
            members.discard(listener)
            self.presence[group].discard(listener)
            if not members:
                del self.groups[group]
                del self.presence[group]
                self.heads.pop(group, None)
                self.group_session.pop(group, None)
                if self.channel is not None:
                    await _layer_call(self.layer.group_discard(group, self.channel))

    class _GroupLock:
        def __init__(self, hub: Hub, group: str) -> None:
            self.hub, self.group = hub, group

        async def __aenter__(self) -> None:
            hub = self.hub
            hub._lock_users[self.group] += 1
            lock = hub._locks.setdefault(self.group, asyncio.Lock())
            await lock.acquire()

        async def __aexit__(self, *exc: object) -> None:
            hub = self.hub
            hub._locks[self.group].release()
            hub._lock_users[self.group] -= 1
            if hub._lock_users[self.group] == 0:
                del hub._lock_users[self.group]
                del hub._locks[self.group]

    def _group_lock(self, group: str) -> Hub._GroupLock:
        return Hub._GroupLock(self, group)

    async def _read(self, channel: str) -> None:
        while True:
            try:
                message = await self.layer.receive(channel)
                kind = message.get("type")
                if kind == groups.EVENT:
                    await self._on_event(message["g"], groups.decode_event(message), message.get("p"))
                elif kind == groups.EVENTS:
                    for frame in groups.decode_events(message):
                        await self._on_event(message["g"], frame, message.get("p"))
                elif kind == groups.DOC:
                    # A shared document's update or awareness: its rooms (events_app.docsocket).
                    for listener in tuple(self.groups.get(message["g"], ())):
                        handler = getattr(listener, "doc_message", None)
                        if handler is not None:
                            handler(message)
                elif message.get("type") == groups.CONTROL:
                    control = groups.decode_control(message)
                    if control is None:
                        log.warning("Ignored an unknown control message: %.200r", message)
                        continue
                    for listener in tuple(self.groups.get(message["g"], ())):
                        listener.control(control)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Hub failed to handle a channel-layer message")
                await asyncio.sleep(0.05)

    async def _on_event(self, group: str, frame: Frame, sent_at: float | None) -> None:
        if group not in self.groups:
            return
        seq = frame.seq
        if seq is not None:
            head = self.heads.get(group, 0)
            if seq <= head:
                return
            if seq > head + 1:
                session_id = frame.session_id
                assert session_id is not None  # a persisted event names its session
                await self._fill(group, session_id, head, seq - 1)
                # The head check may have run meanwhile and passed this event on already.
                if group not in self.groups or seq <= self.heads.get(group, 0):
                    return
            self.heads[group] = seq
        if sent_at is not None:  # sent after the commit: the lag is the fan-out's own
            DELIVERY_LAG.observe(max(0.0, time.time() - sent_at))
        self._deliver(group, frame)

    async def _fill(self, group: str, session_id: str, after: int, upto: int) -> None:
        from events_app.history import events_between

        frames = await off_loop(events_between)(
            session_id, after, upto, limit=upto - after
        )
        for frame in frames:
            assert frame.seq is not None
            if frame.seq > self.heads.get(group, 0):
                self.heads[group] = frame.seq
                self._deliver(group, frame)

    def _deliver(self, group: str, frame: Frame) -> None:
        if frame.seq is None and frame.type.startswith("presence."):
            listeners = tuple(self.presence.get(group, ()))
        else:
            listeners = tuple(self.groups.get(group, ()))
        for listener in listeners:
            listener.deliver(frame)
        EVENTS_DELIVERED.inc(len(listeners))  # once per frame, not once per connection

    async def _check_heads(self) -> None:
        interval = settings.TANDEM_HEARTBEAT_SECONDS
        while True:
            await asyncio.sleep(interval)
            try:
                sessions = dict(self.group_session)
                if not sessions:
                    continue
                found = await off_loop(heads)(list(sessions.values()))
                for group, session_id in sessions.items():
                    head = found.get(session_id)
                    if head is not None and group in self.heads and head > self.heads[group]:
                        await self._fill(group, session_id, self.heads[group], head)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Hub head check failed")

    def subscription_count(self) -> int:
        return len(self.groups)


async def subscribe_eventually(hub: Hub, group: str, listener: Listener) -> None:
    """Subscribe ``listener`` to ``group``, retrying with a bounded backoff while the
    channel layer (Redis) is unreachable. For listeners that can do without it for a
    while (replies and agent pools, which also read the database); cancel to give up."""
    delay = 0.1
    while True:
        try:
            await hub.subscribe(group, listener)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if delay == 0.1:
                log.warning("Cannot subscribe to %s (channel layer unreachable); retrying", group)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


HUB = runtime.Component("hub", Hub)


def get_hub() -> Hub:
    """The hub of the running loop's runtime."""
    return HUB.get()


def local_subscriptions() -> tuple[int, int]:
    """(channel-layer groups held, listeners in them) by every hub of this process."""
    hubs = [hub for rt in runtime.every() if (hub := HUB.find(rt)) is not None]
    return sum(len(h.groups) for h in hubs), sum(len(m) for h in hubs for m in h.groups.values())
