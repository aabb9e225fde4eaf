"""The shared document's WebSocket, ``/ws/sessions/{id}/doc/`` (PROTOCOL §10): the
y-websocket wire protocol over binary frames, so a stock ``y-websocket``
``WebsocketProvider`` or a ``pycrdt`` client syncs with it.

One ``Room`` per document per process (per runtime) holds that document's local
connections and **one** hub subscription to its group (``groups.doc_group``). Every
change reaches editors the same way, whoever made it: stored first
(``sessions_app.doc``, one transaction), then, after the commit, sent to the group with
its version; each process's room passes it to its connections (not back to the one it
came from). Versions are contiguous per document, so a room that sees one skip ahead
(a message lost, or two processes' sends crossing) reads what it missed from the
database first, and a periodic check catches a lost last one. Awareness (cursors, names)
takes the same path without being stored, and reaches every connection, its sender's
included (as on the stock y-websocket server); each room also keeps the states it has
seen, for connections that join later.

Frames (y-protocols): ``varUint(type)`` then the payload. ``0`` sync: ``varUint(0)``
step 1 + state vector, ``1`` step 2 + update, ``2`` update, each ``varUint8Array``;
``1`` awareness: ``varUint8Array(update)``; ``3`` query awareness; ``2`` auth (ignored).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from redis.exceptions import RedisError

from events_app import fanout, groups
from events_app.consumers import CLIENT_GONE, WS_CLOSE_CODES, ServedSocket
from events_app.metrics import OPEN_STREAMS, SLOW_DISCONNECTS
from events_app.streams import STREAMS, StreamRequest, prepare
from events_app.types import Frame
from project import runtime
from project.batch import Batcher
from project.db import off_loop
from project.errors import ApiError, AuthenticationFailed, NotFound, PayloadTooLarge
from project.limits import arelease_stream_slot, streams_unavailable
from sessions_app import doc as docs
from sessions_app.access import live_key_digests, role_of
from sessions_app.models import Role

log = logging.getLogger(__name__)

MSG_SYNC, MSG_AWARENESS, MSG_AUTH, MSG_QUERY_AWARENESS = 0, 1, 2, 3
SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE = 0, 1, 2
AWARENESS_TIMEOUT = 30.0  # y-protocols' outdatedTimeout: clients renew every 15 s
MAX_AWARENESS_CLIENTS = 1000  # states a room keeps

# Why a document socket closed -> its close code (and reason text), beyond the
# event streams' codes (WS_CLOSE_CODES): PROTOCOL §6 and §10.
DOC_CLOSE_CODES = {
    **WS_CLOSE_CODES,
    "bad_request": 4400,  # a frame that is not y-websocket, or an update that does not decode
    "permission_denied": 4403,  # a viewer's update
    "unavailable": 4503,  # Redis unreachable while the socket joined its document (as prepare's 503)
}


def _redis_unreachable(exc: BaseException) -> bool:
    """A failure to reach Redis (the channel layer) rather than a bug: the socket is
    refused with 4503, as an event socket is when its slot cannot be taken."""
    return isinstance(exc, (RedisError, OSError, TimeoutError))


class ProtocolError(Exception):
    """A frame that is not the y-websocket protocol."""


# ---------------------------------------------------------------- the wire format


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def var_uint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise ProtocolError("truncated frame")
            if shift > 49:  # lib0 numbers are at most 2**53
                raise ProtocolError("number too large")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        if length > len(self.data) - self.pos:
            raise ProtocolError("truncated frame")
        out = self.data[self.pos : self.pos + length]
        self.pos += length
        return out

    def var_string(self) -> str:
        try:
            return self.var_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes")


def var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


def sync_frame(kind: int, payload: bytes) -> bytes:
    return bytes((MSG_SYNC, kind)) + var_bytes(payload)


def awareness_frame(update: bytes) -> bytes:
    return bytes((MSG_AWARENESS,)) + var_bytes(update)


@dataclass(frozen=True)
class Incoming:
    kind: str  # "step1" | "step2" | "update" | "awareness" | "query_awareness" | "auth"
    payload: bytes = b""


def parse_frame(data: bytes) -> Incoming:
    reader = _Reader(data)
    kind = reader.var_uint()
    if kind == MSG_SYNC:
        sub = reader.var_uint()
        payload = reader.var_bytes()
        reader.end()
        names = {SYNC_STEP1: "step1", SYNC_STEP2: "step2", SYNC_UPDATE: "update"}
        if sub not in names:
            raise ProtocolError(f"unknown sync message {sub}")
        return Incoming(names[sub], payload)
    if kind == MSG_AWARENESS:
        payload = reader.var_bytes()
        reader.end()
        return Incoming("awareness", payload)
    if kind == MSG_QUERY_AWARENESS:
        reader.end()
        return Incoming("query_awareness")
    if kind == MSG_AUTH:
        return Incoming("auth")
    raise ProtocolError(f"unknown message type {kind}")


@dataclass(frozen=True)
class AwarenessEntry:
    client: int
    clock: int
    state: str  # JSON text; "null" when the client left


def parse_awareness(update: bytes) -> list[AwarenessEntry]:
    reader = _Reader(update)
    count = reader.var_uint()
    if count > 100:
        raise ProtocolError("too many awareness states in one update")
    entries = []
    for _ in range(count):
        client, clock, state = reader.var_uint(), reader.var_uint(), reader.var_string()
        try:
            orjson.loads(state)
        except orjson.JSONDecodeError:
            raise ProtocolError("awareness state is not JSON") from None
        entries.append(AwarenessEntry(client, clock, state))
    reader.end()
    return entries


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    out = bytearray(var_uint(len(entries)))
    for e in entries:
        out += var_uint(e.client) + var_uint(e.clock) + var_bytes(e.state.encode("utf-8"))
    return bytes(out)


# ---------------------------------------------------------------- rooms


@dataclass
class _State:
    clock: int
    state: str
    owner: str  # the local connection it came from; "" for another process's
    seen: float  # loop time


class Room:
    """One document's connections in this process, and its one hub subscription."""

    def __init__(self, rooms: _Rooms, session_id: str) -> None:
        self.rooms = rooms
        self.session_id = session_id
        self.group = groups.doc_group(session_id)
        self.conns: dict[str, DocConnection] = {}
        self.head = 0
        self.inbox: asyncio.Queue[groups.DocMessage] = asyncio.Queue()
        self.awareness: dict[int, _State] = {}
        self.task: asyncio.Task[None] | None = None
        self.wants_presence = False
        self.id = f"room_{secrets.token_hex(6)}"
        # The updates this process's editors send, stored a batch at a time: one
        # transaction (one row lock, one commit) for every update that arrived while the
        # last batch was being stored, so a busy document is not one commit per keystroke.
        self.writes: Batcher[docs.Incoming, docs.Applied | None] = Batcher(
            f"doc-{session_id}", off_loop(functools.partial(docs.apply_updates, session_id)), limit=200
        )

    # hub callbacks: the room is the listener of its group
    def deliver(self, frame: Frame) -> None:
        pass

    def control(self, message: groups.Control) -> None:
        pass

    def doc_message(self, message: groups.DocMessage) -> None:
        self.inbox.put_nowait(message)

    async def start(self) -> None:
        await fanout.get_hub().subscribe(self.group, self)
        # Read after joining the group: anything stored before is at or below this
        # version, anything after arrives through the group.
        self.head = await off_loop(docs.doc_version)(self.session_id)
        self.task = self.rooms.runtime.spawn(self._run(), name=f"tandem-doc-room-{self.session_id}")
        # Who is already here, on other processes: their rooms answer with the states
        # their connections set (clients renew theirs only every 15 s).
        fanout.send_to_group(self.group, groups.encode_doc_query(self.session_id, self.id))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            await fanout.get_hub().unsubscribe(self.group, self)

    async def _run(self) -> None:
        interval = settings.TANDEM_HEARTBEAT_SECONDS
        while True:
            try:
                message = await asyncio.wait_for(self.inbox.get(), timeout=interval)
            except TimeoutError:
                await self._check_head()
                continue
            try:
                if message.get("q"):
                    self._on_query(message)
                elif message.get("v") is None:
                    self._on_awareness(message)
                else:
                    await self._on_update(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Document room %s failed to pass on a message", self.session_id)

    async def _on_update(self, message: groups.DocMessage) -> None:
        version = message["v"]
        assert version is not None
        if version <= self.head:
            return
        if version > self.head + 1:
            await self._fill(version - 1)
            if version <= self.head:
                return
        self.head = version
        self._send_all(sync_frame(SYNC_UPDATE, message["u"]), skip=message["o"])
        # Another process's change, already stored: into this process's copy of the
        # document (microseconds; never waits), so the next change here skips reading it.
        docs.absorb(self.session_id, version, message["u"])

    async def _fill(self, upto: int) -> None:
        updates = await off_loop(docs.updates_between)(self.session_id, self.head, upto)
        for update in updates:
            self._send_all(sync_frame(SYNC_UPDATE, update), skip="")
        self.head = max(self.head, upto)

    async def _check_head(self) -> None:
        try:
            stored = await off_loop(docs.doc_version)(self.session_id)
        except Exception:
            log.exception("Document room %s could not read its version", self.session_id)
            return
        if stored > self.head:
            await self._fill(stored)
        now = self.rooms.runtime.loop.time()
        for client, st in list(self.awareness.items()):
            if now - st.seen > AWARENESS_TIMEOUT and not st.owner:
                del self.awareness[client]

    def _on_query(self, message: groups.DocMessage) -> None:
        if message["o"] == self.id:
            return
        ours = [AwarenessEntry(c, st.clock, st.state) for c, st in self.awareness.items() if st.owner]
        if ours:
            fanout.send_to_group(
                self.group, groups.encode_doc_awareness(self.session_id, encode_awareness(ours), self.id)
            )

    def _on_awareness(self, message: groups.DocMessage) -> None:
        update = message["a"]
        origin = message["o"]
        if origin == self.id:
            return  # our answer to another room's query
        if origin not in self.conns:  # another process's (ours were kept when they came in)
            self.keep_awareness(parse_awareness(update), "")
        # To every connection, its sender included, as the stock y-websocket server does:
        # a stock client closes a socket that hears nothing for 30 s, and alone in a
        # document its own renewal (every 15 s) is all it would hear.
        self._send_all(awareness_frame(update), skip="")

    def keep_awareness(self, entries: list[AwarenessEntry], owner: str) -> None:
        now = self.rooms.runtime.loop.time()
        for e in entries:
            known = self.awareness.get(e.client)
            if known is not None and e.clock < known.clock:
                continue
            if e.state == "null":
                self.awareness.pop(e.client, None)
            elif known is not None or len(self.awareness) < MAX_AWARENESS_CLIENTS:
                self.awareness[e.client] = _State(e.clock, e.state, owner, now)

    def awareness_snapshot(self) -> bytes | None:
        if not self.awareness:
            return None
        entries = [AwarenessEntry(c, st.clock, st.state) for c, st in self.awareness.items()]
        return encode_awareness(entries)

    def _send_all(self, frame: bytes, skip: str) -> None:
        for conn_id, conn in tuple(self.conns.items()):
            if conn_id != skip:
                conn.push(frame)

    def leave(self, conn: DocConnection) -> bytes | None:
        """Take ``conn`` out; the awareness update saying its clients left, if any."""
        self.conns.pop(conn.id, None)
        gone = [
            AwarenessEntry(client, st.clock + 1, "null")
            for client, st in self.awareness.items() if st.owner == conn.id
        ]
        for e in gone:
            del self.awareness[e.client]
        return encode_awareness(gone) if gone else None


class _Rooms:
    def __init__(self, rt: runtime.Runtime) -> None:
        self.runtime = rt
        self.rooms: dict[str, Room] = {}
        self.lock = asyncio.Lock()

    async def join(self, conn: DocConnection) -> Room:
        async with self.lock:
            room = self.rooms.get(conn.session_id)
            if room is None:
                room = self.rooms[conn.session_id] = Room(self, conn.session_id)
                try:
                    await room.start()
                except BaseException:
                    del self.rooms[conn.session_id]
                    await room.stop()
                    raise
            room.conns[conn.id] = conn
            return room

    async def leave(self, conn: DocConnection, room: Room) -> None:
        gone = room.leave(conn)
        if gone is not None:
            fanout.send_to_group(room.group, groups.encode_doc_awareness(room.session_id, gone, conn.id))
        async with self.lock:
            if not room.conns and self.rooms.get(room.session_id) is room:
                del self.rooms[room.session_id]
                await room.stop()


ROOMS = runtime.Component("doc-rooms", _Rooms)


# ---------------------------------------------------------------- one connection


class Closing(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DocConnection:
    """One document socket: its outbound queue and what it may do. A listener of the
    session's group as well, for the controls every stream obeys (removal, deletion,
    a disabled user)."""

    def __init__(self, request: StreamRequest, role: str, close: Callable[[str], None]) -> None:
        assert request.session_id is not None
        self.request = request
        self.id = request.connection_id
        self.session_id: str = request.session_id
        self.user = request.user
        self.user_id: int = request.user.pk
        self.can_write = role in (Role.OWNER, Role.EDITOR)
        self.close = close
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.limit: int = settings.TANDEM_STREAM_QUEUE
        self.room: Room | None = None
        self.wants_presence = False
        self.closing = False

    def push(self, frame: bytes) -> None:
        if self.closing:
            return
        if self.queue.qsize() >= self.limit:
            self.closing = True
            SLOW_DISCONNECTS.inc()
            self.close("slow_client")
            return
        self.queue.put_nowait(frame)

    # hub callbacks on the session's group
    def deliver(self, frame: Frame) -> None:
        if frame.type == "session.deleted":
            self.close("session_deleted")

    def control(self, message: groups.Control) -> None:
        if isinstance(message, groups.UserDisabled) and message.user_id == self.user_id:
            self.close("user_disabled")
        elif (
            isinstance(message, groups.KeyRevoked) and message.user_id == self.user_id
            and message.key_digest == self.request.key
        ):
            self.close("key_revoked")
        elif isinstance(message, groups.Revoke) and message.user_id == self.user_id:
            self.close("member_removed")

    def server_stops(self) -> None:
        self.close("shutdown")

    async def handle(self, data: bytes) -> None:
        """One binary frame from the client. Raises ``Closing`` to end the socket."""
        try:
            message = parse_frame(data)
        except ProtocolError:
            raise Closing("bad_request") from None
        if message.kind == "step1":
            try:
                update, _ = await off_loop(docs.sync_reply)(self.session_id, message.payload)
            except docs.BadUpdate:
                raise Closing("bad_request") from None
            self.push(sync_frame(SYNC_STEP2, update))
        elif message.kind in ("step2", "update"):
            await self._update(message)
        elif message.kind == "awareness":
            try:
                entries = parse_awareness(message.payload)
            except ProtocolError:
                raise Closing("bad_request") from None
            if self.room is not None:
                self.room.keep_awareness(entries, self.id)
            fanout.send_to_group(
                groups.doc_group(self.session_id),
                groups.encode_doc_awareness(self.session_id, message.payload, self.id),
            )
        elif message.kind == "query_awareness" and self.room is not None:
            snapshot = self.room.awareness_snapshot()
            if snapshot is not None:
                self.push(awareness_frame(snapshot))

    async def _update(self, message: Incoming) -> None:
        if not self.can_write:
            # y-websocket answers the server's sync step 1 with a step 2 whatever the
            # role: a reader's that holds nothing new is harmless and ignored.
            if message.kind == "step2":
                try:
                    news = await off_loop(docs.brings_news)(self.session_id, message.payload)
                except docs.BadUpdate:
                    raise Closing("bad_request") from None
                if not news:
                    return
            raise Closing("permission_denied")
        try:
            # Stored (committed) before this returns; then sent to every process's
            # editors of the document, this one's through its room.
            if self.room is None:
                raise Closing("internal_error")
            await self.room.writes.submit(docs.Incoming(self.user, message.payload, self.id))
        except docs.BadUpdate:
            raise Closing("bad_request") from None
        except PayloadTooLarge:
            raise Closing("payload_too_large") from None


# ---------------------------------------------------------------- the consumer


class DocSocketConsumer(ServedSocket):
    """``/ws/sessions/{id}/doc/``. Refusals accept and close with 44xx, as on the other
    WebSockets (PROTOCOL §6)."""

    async def connect(self) -> None:
        self.conn: DocConnection | None = None
        self.writer: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.slot: str | None = None
        self.joined: list[Any] = []  # (group, listener) held on the hub
        self.ended = False
        session_id = self.scope["url_route"]["kwargs"]["session_id"]
        try:
            request = await prepare(self.scope, session_id, "ws")
        except ApiError as err:
            await self._refuse(err)
            return
        except Exception:
            log.exception("Opening a document socket failed")
            await self._refuse(None)
            return
        self.slot = request.connection_id
        try:
            conn = DocConnection(request, Role.VIEWER, self._end)
            hub = fanout.get_hub()
            # Listen for removal and deletion first, then read the role: a removal
            # committed after the read arrives as a control.
            group = groups.session_group(session_id)
            await hub.subscribe(group, conn, session_id)
            self.joined.append((group, conn))
            role = await off_loop(role_of)(request.user.pk, session_id)
            if role is None:
                raise NotFound()
            # Its key revoked after prepare() read it, before this socket listened.
            if request.key is not None and not await off_loop(live_key_digests)({request.key}):
                raise AuthenticationFailed()
            conn.can_write = role in (Role.OWNER, Role.EDITOR)
            self.conn = conn
        except ApiError as err:
            await self._release()
            await self._refuse(err)
            return
        except Exception as exc:
            await self._release()
            if _redis_unreachable(exc):  # Redis went away after the slot was taken
                log.warning("Refused a document socket: Redis unreachable (%r)", exc)
                await self._refuse(streams_unavailable())
            else:
                log.exception("Opening a document socket failed")
                await self._refuse(None)
            return
        if self.ended:  # removed, or the session deleted, while it was being admitted
            self.conn = None
            await self._release()
            return
        await self.accept()
        OPEN_STREAMS.labels("ws_doc").inc()
        self.writer = asyncio.ensure_future(self._write(conn))
        STREAMS.get().stoppable.add(conn)
        if STREAMS.get().runtime.stopping:
            conn.server_stops()
        if request.expires_at is not None:
            delay = max(0.0, request.expires_at - time.time())
            self.expiry = asyncio.get_running_loop().call_later(delay, self._end, "auth_expired")
        try:
            conn.room = await ROOMS.get().join(conn)
            state_vector, _ = await off_loop(docs.state_vector)(session_id)
        except Exception as exc:
            if _redis_unreachable(exc):
                log.warning("Closed a document socket: Redis unreachable (%r)", exc)
                self._end("unavailable")
            else:
                log.exception("Opening a document socket failed")
                self._end("internal_error")
            return
        conn.push(sync_frame(SYNC_STEP1, state_vector))
        snapshot = conn.room.awareness_snapshot()
        if snapshot is not None:
            conn.push(awareness_frame(snapshot))

    async def _refuse(self, err: ApiError | None) -> None:
        await self.accept()
        if err is None:
            await self.close(code=WS_CLOSE_CODES["internal_error"], reason="internal_error")
        else:
            await self.close(code=4000 + err.status if err.status < 1000 else 4500, reason=err.code)

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.conn is not None:
            self.conn.closing = True
        if self.writer is not None:
            self.writer.cancel()
        asyncio.ensure_future(self._close_quietly(reason))

    async def _close_quietly(self, reason: str) -> None:
        code = DOC_CLOSE_CODES.get(reason, 1011)
        with contextlib.suppress(*CLIENT_GONE):
            await self.close(code=code, reason=reason)

    async def _write(self, conn: DocConnection) -> None:
        send = self.base_send
        try:
            while True:
                frame = await conn.queue.get()
                await send({"type": "websocket.send", "bytes": frame})
        except CLIENT_GONE:
            return

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        conn = self.conn
        if conn is None or self.ended:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > settings.TANDEM_MAX_WS_FRAME:
            self._end("payload_too_large")
            return
        if text_data is not None or bytes_data is None:
            self._end("bad_request")  # the protocol is binary
            return
        try:
            await conn.handle(bytes_data)
        except Closing as closing:
            self._end(closing.reason)
        except ApiError as err:
            self._end("session_deleted" if err.status == 404 else "bad_request")
        except Exception:
            log.exception("Document socket failed on a frame")
            self._end("internal_error")

    async def _release(self) -> None:
        hub = fanout.get_hub()
        for group, listener in getattr(self, "joined", []):
            with contextlib.suppress(Exception):
                await hub.unsubscribe(group, listener)
        self.joined = []
        slot = getattr(self, "slot", None)
        if slot is not None:
            self.slot = None
            await arelease_stream_slot(slot)

    async def disconnect(self, code: int) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        expiry, writer = getattr(self, "expiry", None), getattr(self, "writer", None)
        if expiry is not None:
            expiry.cancel()
        if writer is not None:
            writer.cancel()
        if conn is not None:
            OPEN_STREAMS.labels("ws_doc").dec()
            conn.closing = True
            STREAMS.get().stoppable.discard(conn)
            if conn.room is not None:
                with contextlib.suppress(Exception):
                    await ROOMS.get().leave(conn, conn.room)
        await self._release()
