"""One open stream — SSE or WebSocket, one session or the user level — independent of its
transport. The consumers authenticate through ``prepare``, then hand bytes between the
socket and a ``Connection``; everything a stream decides lives here.

A connection follows one or more sessions. For each it keeps the position (last seq)
the client has, so replay and live events meet without a gap or a duplicate: it joins
the hub first (live frames queue up), reads the head, replays from the database up to
it, then drains the queue, skipping what the replay already sent.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from events_app import cursors, fanout, groups, presence
from events_app.history import events_between
from events_app.metrics import EVENTS_DELIVERED, OPEN_STREAMS, RESETS, RESUMES, SLOW_DISCONNECTS
from events_app.models import Event
from events_app.services import parse_position
from events_app.types import Frame, TypeFilter, iso, sse_bytes
from project import runtime
from project.auth import StreamClaim, query_params, read_stream_claim, resolve_claims
from project.batch import Batcher
from project.db import off_loop
from project.errors import ApiError, AuthenticationFailed, BadRequest, NotFound
from project.limits import arelease_stream_slot, atake_stream_slot, streams_unavailable
from sessions_app.access import IN_LIST_MAX, live_key_digests, member_pairs, sessions_of_users
from sessions_app.serializers import user_data

log = logging.getLogger(__name__)

# A field of the first event's block, not a block of its own: clients such as httpx-sse
# yield every block as an event, and an empty one breaks the usual json.loads(data).
SSE_RETRY = b"retry: 3000\n"
REPLAY_BATCH = 500


@dataclass(frozen=True)
class StreamRequest:
    user: Any
    expires_at: float | None
    session_id: str | None  # None: the user-level stream
    transport: str  # "sse" | "ws"
    types: TypeFilter | None
    named: bool
    resume: int | dict[str, int] | None
    connection_id: str = ""  # also the stream's slot in the per-user limit
    cursor: cursors.Resume | None = None  # the user-level stream's, when resuming
    session_ids: list[str] = field(default_factory=list)  # the user-level stream's, at open
    key: str | None = None  # the digest of the API key that opened it, if one did


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _session_id_ok(session_id: str) -> bool:
    # Ids are printable ASCII of at most 32 characters (sessions_app.access.check_member).
    return len(session_id) <= 32 and session_id.isascii() and session_id.isprintable()


@dataclass(frozen=True)
class _Lookup:
    """What one opening stream asks the database before it is admitted."""

    claim: StreamClaim
    scope: dict[str, Any]
    session_id: str | None  # None: the user-level stream, which needs its sessions
    raw_cursor: str | None  # the user-level stream's resume cursor, decoded per user


@dataclass(frozen=True)
class _Found:
    user: Any
    session_ids: list[str]  # the user-level stream's sessions
    cursor: cursors.Resume | ApiError | None


def _lookup(items: list[_Lookup]) -> list[_Found | BaseException]:
    """Every open of a batch at once: the users (one query for every token and ticket),
    the memberships asked about (one query), the user-level streams' sessions (one
    query), and their cursors. Synchronous: the opener runs it through off_loop."""
    users = resolve_claims([(item.claim, item.scope) for item in items])
    pairs = member_pairs({
        (u.pk, item.session_id) for item, u in zip(items, users, strict=True)
        if item.session_id is not None and not isinstance(u, ApiError) and _session_id_ok(item.session_id)
    })
    sessions_of = sessions_of_users({
        u.pk for item, u in zip(items, users, strict=True)
        if item.session_id is None and not isinstance(u, ApiError)
    })
    out: list[_Found | BaseException] = []
    for item, user in zip(items, users, strict=True):
        if isinstance(user, ApiError):
            out.append(user)
        elif item.session_id is not None:
            out.append(_Found(user, [], None) if (user.pk, item.session_id) in pairs else NotFound())
        else:
            cursor: cursors.Resume | ApiError | None = None
            if item.raw_cursor:
                try:
                    cursor = cursors.decode(item.raw_cursor, user.pk)
                except ApiError as err:
                    cursor = err
            out.append(_Found(user, sessions_of.get(user.pk, []), cursor))
    return out


@dataclass(frozen=True)
class _Recheck:
    """What an opening stream asks the database once it listens on its groups."""

    user_id: int
    session_ids: list[str]  # is the user still a member of each?
    resumes: list[tuple[str, int]]  # (session, after) behind the head: is after + 1 kept?
    heads: list[str]  # sessions whose stored head is needed (a resume ahead of the hub's)
    key: str | None = None  # the opening API key's digest: is it still a key?


@dataclass(frozen=True)
class _Rechecked:
    active: bool
    removed: list[str]
    kept: set[tuple[str, int]]
    heads: dict[str, int]


def _recheck(items: list[_Recheck]) -> list[_Rechecked | BaseException]:
    user_ids = {item.user_id for item in items}
    active = set(
        get_user_model().objects.filter(pk__in=user_ids, is_active=True).values_list("pk", flat=True)
    )
    keys = {item.key for item in items if item.key is not None}
    live_keys = live_key_digests(keys) if keys else set()
    member = member_pairs({(item.user_id, sid) for item in items for sid in item.session_ids})
    wanted = {(sid, after + 1) for item in items for sid, after in item.resumes}
    kept: set[tuple[str, int]] = set()
    # Retention always removes the lowest seqs first, so if after + 1 is kept, all is.
    sessions = sorted({s for s, _ in wanted})
    for i in range(0, len(sessions), IN_LIST_MAX):
        chunk = set(sessions[i:i + IN_LIST_MAX])
        seqs = {q for s, q in wanted if s in chunk}
        kept |= set(Event.objects.filter(session_id__in=chunk, seq__in=seqs).values_list("session_id", "seq"))
    kept &= wanted
    head_ids = sorted({sid for item in items for sid in item.heads})
    heads: dict[str, int] = {}
    for i in range(0, len(head_ids), IN_LIST_MAX):
        heads.update(fanout.heads(head_ids[i:i + IN_LIST_MAX]))
    return [
        _Rechecked(
            item.user_id in active and (item.key is None or item.key in live_keys),
            [sid for sid in item.session_ids if (item.user_id, sid) not in member],
            {(sid, after) for sid, after in item.resumes if (sid, after + 1) in kept},
            {sid: heads[sid] for sid in item.heads if sid in heads},
        )
        for item in items
    ]


class _Opener:
    """A runtime's batchers for opening streams: however many open at once, each step
    is one database call (one thread hop, one connection) for all of them."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.lookups: Batcher[_Lookup, _Found] = Batcher("stream-lookup", off_loop(_lookup))
        self.rechecks: Batcher[_Recheck, _Rechecked] = Batcher("stream-recheck", off_loop(_recheck))


OPENER = runtime.Component("opener", _Opener)


async def prepare(scope: dict[str, Any], session_id: str | None, transport: str) -> StreamRequest:
    """Authenticate, authorise and read the parameters of a stream; take its slot in
    the per-user limit. The signature and expiry of its credential are checked here; the
    user (active) and the membership in the database, batched with every stream opening
    meanwhile (``_lookup``). Raises ApiError, in the order: credentials, membership,
    parameters, the limit."""
    creds = scope.get("stream_auth")
    if isinstance(creds, Exception):
        raise creds
    claim = creds if isinstance(creds, StreamClaim) else read_stream_claim(
        scope, allow_cookie=transport == "sse"
    )
    params = query_params(scope)
    raw_resume = _header(scope, b"last-event-id")
    if raw_resume is None or raw_resume == "":
        raw_resume = params.get("last_event_id")
    found = await OPENER.get().lookups.submit(
        _Lookup(claim, scope, session_id, (raw_resume or None) if session_id is None else None)
    )
    try:
        types = TypeFilter.parse(params.get("types"))
    except ValueError as exc:
        raise BadRequest(str(exc), details={"types": params.get("types", "")[:200]}) from None
    named = params.get("named", "0") in ("1", "true")
    resume: int | dict[str, int] | None
    cursor: cursors.Resume | None = None
    if session_id is not None:
        resume = parse_position(raw_resume, "last_event_id")
    elif isinstance(found.cursor, ApiError):
        raise found.cursor
    elif found.cursor is not None:
        cursor = found.cursor
        resume = cursor.positions
    else:
        resume = None
    connection_id = f"con_{secrets.token_hex(8)}"
    # Last, so a refused request never holds a slot; Connection.close gives it back.
    await atake_stream_slot(found.user.pk, connection_id)
    return StreamRequest(
        found.user, claim.expires_at, session_id, transport, types, named, resume, connection_id,
        cursor, found.session_ids, claim.key,
    )


class Stoppable(Protocol):
    """An open stream that ends when the server stops (``when_server_stops``)."""

    def server_stops(self) -> None: ...


class _Streams:
    """The streams of one runtime. Weak sets: a stream whose consumer died without
    closing it must not be kept alive by being listed here."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.runtime = rt
        # The tasks serving streams, so a server that stops can wait for them to end
        # their responses (uvicorn cancels them, then shuts down without waiting).
        self.serving: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        # The open streams that asked to hear of the server stopping (when_server_stops).
        self.stoppable: weakref.WeakSet[Stoppable] = weakref.WeakSet()
        # The idle connections given frames in this turn of the loop (the hot path).
        self.flusher = _Flusher(rt.loop)


STREAMS = runtime.Component("streams", _Streams)


def serving(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        STREAMS.get().serving.add(task)


async def wait_for_streams(timeout: float) -> None:
    pending = [t for t in STREAMS.get().serving if not t.done() and t is not asyncio.current_task()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def end_all_streams() -> None:
    """The server is stopping: every open stream of this runtime ends now (SSE bodies
    finish, WebSockets close with 4012), and one that opens from here on ends as soon as
    it is set up. Clients reconnect to another process and resume there. Idempotent."""
    streams = STREAMS.get()
    streams.runtime.stopping = True
    for conn in list(streams.stoppable):
        conn.server_stops()


class StreamClosed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Writer = Callable[[list[Any]], Awaitable[None]]


class _Flusher:
    """One per runtime (its loop): the idle connections that got frames during this turn of the
    loop, written in one callback once the hub has handed out everything it had. Frames
    of several events for one connection leave in one write, and no connection's task
    wakes up for them (docs/PERFORMANCE.md, the delivery hot path)."""

    __slots__ = ("loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[Connection] = []

    def add(self, conn: Connection) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(conn)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        now = self.loop.time()  # once per turn, not once per write
        for conn in pending:
            conn._flush(now)


class _Resume:
    """A write that ``Connection._flush`` started by hand and that suspended (the ASGI
    server paused writing: the client reads slowly). Awaited by the connection's task, it
    carries on exactly where the write stopped, as if the task had awaited it from the
    start: the future it waits for goes up to the task, the results and exceptions
    (cancellation included) come back down."""

    __slots__ = ("it", "first")

    def __init__(self, it: Generator[Any, Any, Any], first: Any) -> None:
        self.it, self.first = it, first

    def __await__(self) -> Generator[Any, Any, None]:
        it, value = self.it, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                it.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - passed on to the write, as a task would
                try:
                    value = it.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = it.send(sent)
                except StopIteration:
                    return

    def close(self) -> None:
        self.it.close()


class Connection:
    """Transport-neutral: it renders frames as ``bytes`` for SSE and ``str`` for
    WebSocket, and hands lists of them to ``write``."""

    def __init__(self, request: StreamRequest, write: Writer) -> None:
        self.request = request
        self.user_id: int = request.user.pk
        self.user = user_data(request.user)
        self.sse = request.transport == "sse"
        self.write = write
        self._open_gauge = OPEN_STREAMS.labels(request.transport)
        self._counted_open = False
        self.id = request.connection_id or f"con_{secrets.token_hex(8)}"
        self.positions: dict[str, int] = {}
        self.queue: deque[Frame | groups.Control] = deque()
        # Settings read once: they are on the path of every frame to every connection.
        self._queue_limit: int = settings.TANDEM_STREAM_QUEUE
        self._heartbeat: float = settings.TANDEM_HEARTBEAT_SECONDS
        types = request.types
        # Ephemeral frames this stream filters out are dropped on arrival, never queued;
        # and a stream that takes no presence is not even offered it by the hub.
        self._drops_ephemeral = types
        self.wants_presence = types is None or any(
            types(t) for t in ("presence.joined", "presence.left", "presence.updated")
        )
        # A bare future rather than an asyncio.Event, and one timer re-armed per heartbeat
        # period rather than asyncio.timeout() per wait: a wakeup per frame per connection
        # is the hot path.
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # While the task waits (idle), frames are written from the loop's _Flusher rather
        # than by waking the task; what the task must then finish or raise is left here.
        self._streams = STREAMS.get()
        self._loop = self._streams.runtime.loop
        self._flusher = self._streams.flusher
        self._dirty = False  # in the flusher's list for this turn
        self._inflight: _Resume | Awaitable[None] | None = None
        self._failure: BaseException | None = None
        self._named = request.named
        self._types = request.types
        self._last_write = 0.0
        self._beat_due = False
        self._expired = False
        self.overflowed = False
        # Set by the consumer: stops a writer that may be blocked on a stalled socket.
        self.on_overflow: Callable[[], object] | None = None
        self.closed_reason: str | None = None
        self.groups: set[str] = set()
        self.presence_state: dict[str, Any] = {}
        self.hub = fanout.get_hub()
        self._expires_at: float | None = None  # loop time
        self._on_server_stop: Callable[[], object] | None = None
        self.cursors = cursors.CursorTracker(self.user_id) if request.session_id is None else None
        # Between fix_position and start: the heads read and each session's plan.
        self._announced = False  # in presence (start): close() must say it left
        self._opening: tuple[dict[str, int], dict[str, tuple[int, str | None]]] | None = None

    # ------------------------------------------------------------ hub callbacks

    def deliver(self, frame: Frame) -> None:
        if self.overflowed:
            return  # being closed as too slow; the client resumes from its last id
        types = self._drops_ephemeral
        if (
            frame.seq is None and types is not None and frame.type != "session.deleted"
            and not types(frame.type)
        ):
            return  # persisted frames still go through the queue: they move the position
        queue = self.queue
        queue.append(frame)
        if len(queue) > self._queue_limit:
            # Drop the backlog at once: a writer blocked on a stalled socket must not
            # let the queue grow without bound before run() gets to close the stream.
            self.overflowed = True
            queue.clear()
            SLOW_DISCONNECTS.inc()
            if self.on_overflow is not None:
                self.on_overflow()
            self._wake()
        elif not self._dirty:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                # Idle: written at the end of this turn of the loop, without the task.
                # Otherwise the task is awake, or writing, and takes the queue in order.
                self._dirty = True
                self._flusher.add(self)

    def _flush(self, now: float) -> None:
        """Render and write what is queued, from the flusher, while the task waits. The
        write is driven by hand: when the ASGI server takes the bytes at once (it did
        not pause writing) it completes here and nothing else runs. When it suspends,
        or anything needs the task (a control message, a session's deletion, a cursor
        to store, an error), the task is woken to take over, in order: frames queued
        from here on wait behind the suspended write, still counted against the limit."""
        self._dirty = False
        waiter = self._waiter
        if waiter is None or waiter.done() or self.overflowed:
            return  # the task has the queue
        queue = self.queue
        batch: list[Any] = []
        try:
            while queue:
                item = queue[0]
                if not isinstance(item, Frame) or item.type == "session.deleted":
                    break  # the task's to handle, after this batch
                queue.popleft()
                out = self._render(item)
                if out is not None:
                    batch.append(out)
            if batch:
                if self.cursors is not None and self.cursors.pending:
                    self._inflight = self.send(batch)  # the cursors are stored first
                    waiter.set_result(None)
                    return
                self._last_write = now
                it = self.write(batch).__await__()
                try:
                    pending = it.send(None)
                except StopIteration:
                    pass
                else:
                    self._inflight = _Resume(it, pending)
                    waiter.set_result(None)
                    return
        except Exception as exc:  # raised by the task, as if it had written
            self._failure = exc
            waiter.set_result(None)
            return
        if queue:
            waiter.set_result(None)

    def control(self, message: groups.Control) -> None:
        self.queue.append(message)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ lifecycle

    def when_server_stops(self, callback: Callable[[], object]) -> None:
        """``callback`` (the consumer's way to end this stream) runs when the server
        stops, or now if it already is stopping."""
        self._on_server_stop = callback
        if self._streams.runtime.stopping:
            self.server_stops()
        else:
            self._streams.stoppable.add(self)

    def server_stops(self) -> None:
        self._streams.stoppable.discard(self)
        callback, self._on_server_stop = self._on_server_stop, None
        if callback is not None:
            callback()

    async def open(self) -> None:
        """Fix the position, then send the opening frames."""
        await self.fix_position()
        await self.start()

    async def fix_position(self) -> None:
        """Join the hub and fix the position: from here on every committed event reaches
        this connection (queued until ``start``). The consumers call it before the SSE
        response headers or the WebSocket accept go out (PROTOCOL §5): a client that
        acts on ``open`` must not miss what commits after it.

        The position in each session is the hub's head once this connection listens:
        the hub passes on every later seq, in order, and the ones up to it were passed on
        before. Then one batched database call (``_recheck``) closes the race with the
        admission check: a user deactivated (or the API key that opened the stream
        revoked), or removed from a session, after that check but before this connection
        listened, may have had the control message that ends the stream pass unheard.
        Still before the headers, such a stream is refused
        (AuthenticationFailed, NotFound) as it would have been a moment earlier; a
        user-level stream just stops following the sessions the user left. Redis failing
        or hanging while it joins is Unavailable (503, WebSocket 4503), as when Redis is
        away before the slot is taken."""
        req = self.request
        if not self._counted_open:
            self._counted_open = True
            self._open_gauge.inc()
        session_ids = [req.session_id] if req.session_id is not None else list(req.session_ids)
        try:
            if req.session_id is None:
                await self._join(groups.user_group(self.user_id), None)
            for session_id in session_ids:
                await self._join(groups.session_group(session_id), session_id)
        except fanout.Unreachable as exc:
            # Redis went away (or hung) after the slot was taken: refused as a stream
            # opened a moment later would be, 503 / 4503 "reconnect shortly", not as a
            # failure. The caller's close() gives back the slot and any group joined.
            log.warning("Refused a stream: Redis unreachable while joining (%s)", exc)
            raise streams_unavailable() from None
        heads = {sid: self.hub.heads.get(groups.session_group(sid), 0) for sid in session_ids}
        wanted = self._wanted(heads)
        resumes = [(sid, after) for sid, after in wanted.items() if after < heads[sid]]
        ahead = [sid for sid, after in wanted.items() if after > heads[sid]]
        checked = await OPENER.get().rechecks.submit(
            _Recheck(self.user_id, session_ids, resumes, ahead, req.key)
        )
        if not checked.active:
            raise AuthenticationFailed()
        if checked.removed and req.session_id is not None:
            raise NotFound()
        for sid in checked.removed:
            await self._leave(groups.session_group(sid))
            heads.pop(sid, None)
        hub_heads = dict(heads)
        for sid, stored in checked.heads.items():
            # A client ahead of the hub (events on their way to it): the stored head,
            # as before; the live frames up to it are dropped as seen.
            heads[sid] = max(heads[sid], stored)
        plans: dict[str, tuple[int, str | None]] = {}
        for sid, head in heads.items():
            after = wanted.get(sid)
            if after is None:
                plans[sid] = (head, None)
            elif after > head:
                plans[sid] = (head, "unknown_position")
            elif after == head or after >= hub_heads[sid] or (sid, after) in checked.kept:
                plans[sid] = (after, None)
            else:
                plans[sid] = (head, "history_expired")
        unknown = req.session_id is None and req.cursor is not None and not req.cursor.known
        if unknown:
            plans = {sid: (head, "unknown_position") for sid, head in heads.items()}
        self._opening = (heads, plans)

    def _wanted(self, heads: dict[str, int]) -> dict[str, int]:
        """Per session, the position the client resumes from, if it resumes."""
        req = self.request
        if req.session_id is not None:
            return {req.session_id: req.resume} if isinstance(req.resume, int) else {}
        if req.cursor is not None and not req.cursor.known:
            return {}
        if isinstance(req.resume, dict):
            # Joined since the cursor: from the start.
            return {sid: req.resume.get(sid, 0) for sid in heads}
        return {}

    async def start(self) -> None:
        """Send server.connected, any reset and the replay (after ``fix_position``)."""
        req = self.request
        assert self._opening is not None, "fix_position first"
        heads, plans = self._opening
        self._opening = None
        connected: dict[str, Any] = {"connection_id": self.id, "resumed": req.resume is not None}
        resets: list[tuple[str, str]] = [
            (sid, reason) for sid, (_, reason) in plans.items() if reason is not None
        ]
        if req.resume is not None:
            RESUMES.inc()
        for _, why in resets:
            RESETS.labels(why).inc()
        if resets:
            connected["resumed"] = False
        if req.session_id is not None:
            connected["last_seq"] = heads.get(req.session_id, 0)
        else:
            connected["last_seq"] = None
        for sid, (position, reset) in plans.items():
            self.positions[sid] = heads.get(sid, 0) if reset is not None else position
        if self.cursors is not None:
            self.cursors.start(self.positions, req.cursor.snapshot if req.cursor else None)
            connected["cursor"] = self.cursors.cursor(self.positions)
        first: list[Any] = [SSE_RETRY] if self.sse else []
        first.append(self._render_control(req.session_id, "server.connected", connected))
        for sid, why in resets:
            first.append(
                self._render_control(sid, "stream.reset", {"reason": why, "last_seq": heads.get(sid, 0)})
            )
        await self.send(first)
        if req.session_id is not None:
            await self._announce("presence.joined")
        for sid, (position, reset) in plans.items():
            if reset is None and position < heads.get(sid, 0):
                await self._replay(sid, position, heads[sid])

    async def _replay(self, session_id: str, after: int, upto: int) -> None:
        while after < upto:
            frames = await off_loop(events_between)(session_id, after, upto, REPLAY_BATCH)
            if not frames:
                break
            await self.send([out for f in frames if (out := self._render(f)) is not None])
            EVENTS_DELIVERED.inc(len(frames))
            after = frames[-1].seq or upto

    async def send(self, chunks: list[Any]) -> None:
        if self.cursors is not None and self.cursors.pending:
            # Stored before any frame naming them leaves: every cursor a client holds resumes.
            await off_loop(cursors.save)(self.cursors.take_pending())
        self._last_write = self._loop.time()
        await self.write(chunks)

    def _arm_timer(self) -> None:
        loop = self._loop
        due = self._last_write + self._heartbeat
        if self._expires_at is not None:
            due = min(due, self._expires_at)
        self._timer = loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        now = self._loop.time()
        if self._expires_at is not None and now >= self._expires_at:
            self._expired = True
            self._wake()
            return
        if self.cursors is not None and self.cursors.too_old():
            self.cursors.stale = True  # the next cursor names a new snapshot
        if now - self._last_write >= self._heartbeat - 0.001:
            self._beat_due = True
            self._last_write = now  # the next heartbeat is a period after this one
            self._wake()
        self._arm_timer()

    async def run(self) -> str:
        """Write live frames until the stream ends; returns why it ended."""
        loop = self._loop
        expires = self.request.expires_at
        self._expires_at = None if expires is None else loop.time() + (expires - time.time())
        if not self._last_write:
            self._last_write = loop.time()
        self._arm_timer()
        try:
            while True:
                if not self.queue and not self.overflowed and not self._beat_due and not self._expired:
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                if self._inflight is not None:
                    inflight = self._inflight
                    await inflight
                    self._inflight = None
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if self.overflowed:
                    raise StreamClosed("slow_client")
                if self._expired:
                    await self.send([self._render_control(self.request.session_id, "auth.expired", {})])
                    return "auth_expired"
                batch: list[Any] = []
                while self.queue:
                    item = self.queue.popleft()
                    if isinstance(item, Frame):
                        out = self._render(item)
                        if out is not None:
                            batch.append(out)
                        if item.type == "session.deleted":
                            await self._on_session_deleted(item, batch)
                    else:
                        if batch:
                            await self.send(batch)
                            batch = []
                        await self._command(item)
                if batch:
                    self._beat_due = False
                    await self.send(batch)
                elif self._beat_due:
                    self._beat_due = False
                    await self.send([self._render_control(None, "server.heartbeat", {})])
        except StreamClosed as closed:
            return closed.reason
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            unfinished, self._inflight = self._inflight, None
            if isinstance(unfinished, _Resume) or asyncio.iscoroutine(unfinished):
                unfinished.close()  # a write the stream ended before finishing

    async def close(self) -> None:
        """Leave the hub and presence; safe to call more than once."""
        for group in list(self.groups):
            self.groups.discard(group)
            try:
                await self.hub.unsubscribe(group, self)
            except fanout.Unreachable as exc:  # the hub has let go; Redis drops it with the connection
                log.warning("Leaving %s: Redis unreachable (%s)", group, exc)
            except Exception:
                log.exception("Leaving %s failed", group)
        if self.request.session_id is not None and self.closed_reason is None and self._announced:
            self.closed_reason = "closed"
            try:
                await presence.aremove(self.request.session_id, self.id)
                await self._broadcast_presence("presence.left")
            except Exception:
                log.exception("Presence cleanup failed for %s", self.id)
        self._streams.stoppable.discard(self)
        self._on_server_stop = None
        if self._counted_open:
            self._counted_open = False
            self._open_gauge.dec()
        await arelease_stream_slot(self.id)

    # ------------------------------------------------------------ presence

    async def update_presence(self, state: dict[str, Any]) -> None:
        assert self.request.session_id is not None
        self.presence_state = state
        await self._announce("presence.updated")

    async def _announce(self, type_name: str) -> None:
        assert self.request.session_id is not None  # presence is per session
        self._announced = True  # from here, close() takes the entry back and says so
        await presence.aput(self.request.session_id, self.id, self._presence_entry())
        await self._broadcast_presence(type_name)

    def _presence_entry(self) -> dict[str, Any]:
        return {"user": self.user, "transport": self.request.transport, "state": self.presence_state}

    async def _broadcast_presence(self, type_name: str) -> None:
        session_id = self.request.session_id
        assert session_id is not None
        props = {"user": self.user, "connection_id": self.id, "transport": self.request.transport}
        if self.presence_state:
            props["state"] = self.presence_state
        frame = Frame.make(session_id, type_name, iso(timezone.now()), props)
        fanout.send_frame(groups.session_group(session_id), frame)

    # ------------------------------------------------------------ internals

    async def _join(self, group: str, session_id: str | None) -> None:
        await self.hub.subscribe(group, self, session_id)
        self.groups.add(group)

    async def _leave(self, group: str) -> None:
        if group in self.groups:
            self.groups.discard(group)
            await self.hub.unsubscribe(group, self)

    def _render(self, frame: Frame) -> bytes | str | None:
        # Once per event per connection: locals rather than repeated attribute lookups.
        seq = frame.seq
        cursors = self.cursors
        if seq is not None:
            sid = frame.session_id or ""
            positions = self.positions
            position = positions.get(sid)
            if position is None or seq <= position:
                return None  # a session this stream does not follow (yet), or a duplicate
            if seq != position + 1:
                # Cannot happen while the hub fills gaps; if it does, the client must
                # resume from what it has rather than read a hole.
                raise StreamClosed("gap")
            positions[sid] = seq
            if cursors is not None:
                cursors.advance(sid, seq)
        types = self._types
        if types is not None and not types(frame.type):
            return None
        if cursors is not None and seq is not None:
            cursor = cursors.cursor(self.positions)
            envelope = frame.with_cursor(cursor)
            if self.sse:
                return sse_bytes(envelope, cursor, frame.type if self._named else None)
            return envelope
        if self.sse:
            return frame.sse(self._named)
        return frame.envelope

    def _render_control(self, session_id: str | None, type_name: str, props: dict[str, Any]) -> bytes | str:
        frame = Frame.make(session_id, type_name, iso(timezone.now()), props)
        return frame.sse(self.request.named) if self.sse else frame.envelope

    async def _command(self, command: groups.Control) -> None:
        if isinstance(command, groups.UserDisabled) and command.user_id == self.user_id:
            raise StreamClosed("user_disabled")
        if (
            isinstance(command, groups.KeyRevoked) and command.user_id == self.user_id
            and command.key_digest == self.request.key
        ):
            raise StreamClosed("key_revoked")
        if isinstance(command, groups.Revoke) and command.user_id == self.user_id:
            if self.request.session_id is not None:
                raise StreamClosed("member_removed")
            await self._leave(groups.session_group(command.session_id))
            self.positions.pop(command.session_id, None)
        elif isinstance(command, groups.Join) and self.request.session_id is None:
            session_id = command.session_id
            group = groups.session_group(session_id)
            if group in self.groups:
                return
            await self._join(group, session_id)
            heads = await off_loop(fanout.heads)([session_id])
            head = heads.get(session_id)
            if head is None:  # deleted meanwhile
                await self._leave(group)
                return
            after = min(command.after, head)
            self.positions[session_id] = after
            if self.cursors is not None:
                self.cursors.advance(session_id, after)
            await self._replay(session_id, after, head)

    async def _on_session_deleted(self, frame: Frame, batch: list[Any]) -> None:
        if self.request.session_id is not None:
            if batch:
                await self.send(batch)
                batch.clear()
            raise StreamClosed("session_deleted")
        if frame.session_id:
            await self._leave(groups.session_group(frame.session_id))
            self.positions.pop(frame.session_id, None)
