"""Every channel-layer group, and every message sent through one, defined here once.

Senders build group names and messages with these functions; receivers decode messages
with them. A group name is never parsed back: whatever a receiver needs (the session a
``Revoke`` is about, say) travels in the message itself.

Names keep to what Channels accepts (ASCII letters, digits, ``-``, ``_``, ``.``; fewer
than 100 characters). They carry no deployment prefix of their own: the channel layer
puts ``TANDEM_CHANNEL_PREFIX`` in front of every group and channel it keeps in Redis
(``CHANNEL_LAYERS`` in ``project/settings.py``), so deployments sharing one Redis keep apart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NotRequired, TypedDict

from events_app.types import Frame

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,99}")


def _checked(name: str) -> str:
    # The layer would refuse it later, on the loop, far from the caller that built it.
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"Not a valid channel-layer group name: {name!r}")
    return name


# ---------------------------------------------------------------- groups and channels


def session_group(session_id: str) -> str:
    """Every event of one session, and the controls its session streams obey."""
    return _checked(f"tandem.s.{session_id}")


def user_group(user_id: int) -> str:
    """Controls for one user's user-level streams (sessions joined, user disabled)."""
    return _checked(f"tandem.u.{int(user_id)}")


def pool_group(runner: str) -> str:
    """Where an agents pool (``ReplyRun.runner`` names it) listens for the aborts and
    permission answers of the replies it runs. One group per pool for its whole life,
    rather than one per reply: a reply costs no Redis subscription of its own."""
    digest = hashlib.blake2s(runner.encode(), digest_size=12).hexdigest()  # any runner name fits
    return _checked(f"tandem.p.{digest}")


def doc_group(session_id: str) -> str:
    """The updates and awareness of one session's shared document (PROTOCOL §10)."""
    return _checked(f"tandem.d.{session_id}")


# Every agents pool that takes queued replies listens here for wake-ups (worker mode).
WORKERS_GROUP = "tandem.workers"

# The prefix of each process hub's own channel name (the layer adds a random suffix).
HUB_CHANNEL_PREFIX = "tandem.hub."


# ---------------------------------------------------------------- event messages

EVENT = "tandem.event"
EVENTS = "tandem.events"
CONTROL = "tandem.control"


class EventMessage(TypedDict):
    """One event on a session group. Short keys: one of these goes through Redis per event."""

    type: str  # EVENT
    g: str  # the group it was sent to: the hub routes by it, nobody parses it
    s: str | None  # session id
    q: int | None  # seq (None: ephemeral)
    t: str  # event type
    e: str  # the encoded envelope
    p: NotRequired[float]  # sent at (time.time()), for the delivery-lag metric


def encode_event(group: str, frame: Frame, sent_at: float) -> EventMessage:
    return {
        "type": EVENT, "g": group, "s": frame.session_id, "q": frame.seq, "t": frame.type,
        "e": frame.envelope, "p": sent_at,
    }


def decode_event(message: EventMessage) -> Frame:
    return Frame(message["q"], message["s"], message["t"], message["e"])


class EventsMessage(TypedDict):
    """Several events of one session group that committed together (one ``publish_many``),
    in seq order: one message through Redis, one read by each hub, for the lot."""

    type: str  # EVENTS
    g: str  # the group, as in EventMessage
    s: str | None  # session id
    f: list[tuple[int | None, str, str]]  # each event's (seq, type, encoded envelope)
    p: NotRequired[float]  # sent at (time.time())


def encode_events(group: str, frames: list[Frame], sent_at: float) -> EventsMessage:
    """One message for ``frames``, all of one session, in order."""
    return {
        "type": EVENTS, "g": group, "s": frames[0].session_id,
        "f": [(frame.seq, frame.type, frame.envelope) for frame in frames], "p": sent_at,
    }


def decode_events(message: EventsMessage) -> list[Frame]:
    session_id = message["s"]
    return [Frame(seq, session_id, type_name, envelope) for seq, type_name, envelope in message["f"]]


# ---------------------------------------------------------------- document messages

DOC = "tandem.doc"


class DocMessage(TypedDict):
    """A stored update of a shared document (``v`` its version, ``u`` its bytes), or an
    awareness update (``v`` None, ``a`` its bytes, never stored), on the doc's group."""

    type: str  # DOC
    g: str  # the group it was sent to
    s: str  # session id
    v: int | None  # the update's version; None for awareness
    u: NotRequired[bytes]  # the Yjs update
    a: NotRequired[bytes]  # the awareness update
    q: NotRequired[bool]  # a new room asks the others for the states their connections set
    o: str  # the connection it came from ("" for REST and agents), which has it already


def encode_doc_update(session_id: str, version: int, update: bytes, origin: str) -> DocMessage:
    group = doc_group(session_id)
    return {"type": DOC, "g": group, "s": session_id, "v": version, "u": update, "o": origin}


def encode_doc_awareness(session_id: str, awareness: bytes, origin: str) -> DocMessage:
    group = doc_group(session_id)
    return {"type": DOC, "g": group, "s": session_id, "v": None, "a": awareness, "o": origin}


def encode_doc_query(session_id: str, origin: str) -> DocMessage:
    group = doc_group(session_id)
    return {"type": DOC, "g": group, "s": session_id, "v": None, "q": True, "o": origin}


# ---------------------------------------------------------------- control messages


@dataclass(frozen=True, slots=True)
class Wake:
    """A reply was queued (on ``WORKERS_GROUP``): claim it."""

    action: ClassVar[str] = "wake"


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the reply to ``message_id`` (on its runner's ``pool_group``)."""

    message_id: str
    action: ClassVar[str] = "abort"


@dataclass(frozen=True, slots=True)
class PermissionAnswered:
    """A permission request of the reply to ``message_id`` was answered (on its runner's
    ``pool_group``): stop waiting."""

    message_id: str
    permission_id: str
    action: ClassVar[str] = "permission"


@dataclass(frozen=True, slots=True)
class Revoke:
    """The user was removed from the session (on its ``session_group``): their streams
    of that session end, their user-level streams stop following it."""

    user_id: int
    session_id: str
    action: ClassVar[str] = "revoke"


@dataclass(frozen=True, slots=True)
class UserDisabled:
    """The user was deactivated or deleted (on their ``user_group`` and each of their
    sessions' ``session_group``): every stream of theirs ends."""

    user_id: int
    action: ClassVar[str] = "user_disabled"


@dataclass(frozen=True, slots=True)
class KeyRevoked:
    """An API key of the user was revoked (on their ``user_group`` and each of their
    sessions' ``session_group``): the streams it opened end. ``key_digest`` names the key
    as the stream remembers it (``project.auth.key_digest``), never the key itself."""

    user_id: int
    key_digest: str
    action: ClassVar[str] = "key_revoked"


@dataclass(frozen=True, slots=True)
class Join:
    """The user joined a session (on their ``user_group``): user-level streams follow it
    from ``after``, the seq before the event that says so."""

    session_id: str
    after: int
    action: ClassVar[str] = "join"


Control = Wake | Abort | PermissionAnswered | Revoke | UserDisabled | KeyRevoked | Join

_CONTROLS: dict[str, type[Control]] = {
    cls.action: cls for cls in (Wake, Abort, PermissionAnswered, Revoke, UserDisabled, KeyRevoked, Join)
}


def encode_control(group: str, control: Control) -> dict[str, Any]:
    return {"type": CONTROL, "g": group, "action": control.action, **dataclasses.asdict(control)}


def decode_control(message: Mapping[str, Any]) -> Control | None:
    """None for a message this version does not know (another version's, during a rolling
    deploy): the receiver ignores it rather than fail on it."""
    cls = _CONTROLS.get(message.get("action", ""))
    if cls is None:
        return None
    try:
        return cls(**{f.name: message[f.name] for f in dataclasses.fields(cls)})
    except KeyError:
        return None
