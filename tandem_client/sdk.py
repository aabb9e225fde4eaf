"""Python client for Tandem (PROTOCOL.md v1): REST calls with typed results, errors as
exceptions carrying the server's error code, JWT refresh on 401, and event streams over
SSE that reconnect, resume from the last seq and never yield an event twice.

``Client`` is synchronous, ``AsyncClient`` the asyncio twin with the same methods."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError, aconnect_sse, connect_sse

__all__ = [
    "AsyncClient", "AsyncEventStream", "AuthenticationError", "Client", "ConflictError", "DocEdit", "Document",
    "Event", "EventPage", "EventStream", "Member", "Message", "NetworkError", "NotFoundError", "Permission",
    "PermissionDeniedError", "PostedMessage", "RateLimitedError", "SearchHit", "ServerError", "Session",
    "TandemError", "Tokens", "User", "ValidationError",
]

log = logging.getLogger("tandem_client")
T = TypeVar("T")
JSON = dict[str, Any]

# ---------------------------------------------------------------- errors


class TandemError(Exception):
    """A request failed. ``status`` is the HTTP status (0 when the server was not reached),
    ``code`` the error code of PROTOCOL.md §2 (``not_found``, ``session_busy``, …)."""

    def __init__(self, status: int, code: str, message: str, details: JSON | None = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.status = status
        self.code = code
        self.message = message
        self.details: JSON = details or {}


class NetworkError(TandemError):
    """The server could not be reached (or the URL is not usable): status 0."""


class ValidationError(TandemError):
    """400: ``bad_request`` or ``validation_error`` (``details`` maps field → messages)."""


class AuthenticationError(TandemError):
    """401: no credentials, or credentials that a refresh could not repair."""


class PermissionDeniedError(TandemError):
    """403: your role does not allow this."""


class NotFoundError(TandemError):
    """404: no such resource, or a session you are not a member of."""


class ConflictError(TandemError):
    """409: ``conflict``, ``session_busy``, ``queue_full``, ``not_queued``, ``not_latest``,
    ``already_resolved`` or ``version_conflict``."""


class RateLimitedError(TandemError):
    """429: ``retry_after`` holds the server's ``Retry-After`` in seconds, if it sent one."""

    retry_after: float | None = None


class ServerError(TandemError):
    """5xx."""


_BY_STATUS: dict[int, type[TandemError]] = {
    400: ValidationError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 429: RateLimitedError,
}


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _error_from(response: httpx.Response) -> TandemError:
    status = response.status_code
    code, message = f"http_{status}", response.reason_phrase or "HTTP error"
    details: JSON = {}
    try:
        body = response.json()
        error = body["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details") or {}
    except (ValueError, KeyError, TypeError):
        pass  # not the documented shape (a proxy's page, say): keep the HTTP status
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else TandemError)
    error_obj = cls(status, code, message, details)
    if isinstance(error_obj, RateLimitedError):
        error_obj.retry_after = _retry_after(response)
    return error_obj


def _network_error(url: str, exc: Exception) -> NetworkError:
    reason = str(exc) or type(exc).__name__
    return NetworkError(0, "network_error", f"Cannot reach {url}: {reason}")


# ---------------------------------------------------------------- typed results


@dataclass(frozen=True)
class User:
    id: int
    username: str

    @classmethod
    def from_json(cls, data: JSON) -> User:
        return cls(id=int(data["id"]), username=str(data["username"]))


def _user(data: Any) -> User | None:
    return User.from_json(data) if isinstance(data, dict) else None


@dataclass(frozen=True)
class Session:
    id: str
    title: str
    agent: str
    status: JSON  # {"type": "idle" | "busy" | "retry", ...}
    owner: User | None
    role: str | None  # the caller's role; absent from sessions inside events
    last_seq: int
    created_at: str
    updated_at: str
    forked_from: JSON | None  # {"session_id", "message_id"} on a fork
    raw: JSON = field(repr=False, compare=False)

    @property
    def status_type(self) -> str:
        return str(self.status.get("type", ""))

    @classmethod
    def from_json(cls, data: JSON) -> Session:
        return cls(
            id=data["id"], title=data.get("title", ""), agent=data.get("agent", ""),
            status=data.get("status") or {}, owner=_user(data.get("owner")), role=data.get("role"),
            last_seq=int(data.get("last_seq") or 0), created_at=data.get("created_at", ""),
            updated_at=data.get("updated_at", ""), forked_from=data.get("forked_from"), raw=data,
        )


@dataclass(frozen=True)
class Message:
    id: str
    session_id: str
    role: str  # "user" | "assistant"
    author: User | None
    status: str  # "queued" | "streaming" | "completed" | "cancelled" | "error"
    parts: list[JSON]
    created_at: str
    completed_at: str | None
    error: JSON | None
    raw: JSON = field(repr=False, compare=False)
    superseded_by: str | None = None  # a retried reply: the reply that replaced it

    @property
    def text(self) -> str:
        return "".join(p.get("text", "") for p in self.parts if p.get("type") == "text")

    @classmethod
    def from_json(cls, data: JSON) -> Message:
        return cls(
            id=data["id"], session_id=data.get("session_id", ""), role=data.get("role", ""),
            author=_user(data.get("author")), status=data.get("status", ""), parts=data.get("parts") or [],
            created_at=data.get("created_at", ""), completed_at=data.get("completed_at"),
            error=data.get("error"), raw=data, superseded_by=data.get("superseded_by"),
        )


@dataclass(frozen=True)
class SearchHit:
    session_id: str
    session_title: str
    message_id: str | None  # None: the session's title matched
    snippet: str  # plain text: never render it as HTML
    highlights: list[tuple[int, int]]  # [start, end) ranges of snippet, in code points
    created_at: str

    def marked(self, before: str = "[", after: str = "]") -> str:
        """The snippet with each match between ``before`` and ``after``."""
        out, at = [], 0
        for start, end in self.highlights:
            out += [self.snippet[at:start], before, self.snippet[start:end], after]
            at = end
        return "".join(out) + self.snippet[at:]

    @classmethod
    def from_json(cls, data: JSON) -> SearchHit:
        session = data.get("session") or {}
        return cls(
            session_id=session.get("id", ""), session_title=session.get("title", ""),
            message_id=data.get("message_id"), snippet=data.get("snippet", ""),
            highlights=[(int(a), int(b)) for a, b in data.get("highlights") or []],
            created_at=data.get("created_at", ""),
        )


@dataclass(frozen=True)
class Document:
    """A session's shared document (PROTOCOL §10): Markdown ``text``, its ``version``
    (one more with every change, by anyone) and when it last changed."""

    text: str
    version: int
    updated_at: str
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Document:
        return cls(text=str(data.get("text", "")), version=int(data.get("version") or 0),
                   updated_at=str(data.get("updated_at", "")), raw=data)


@dataclass(frozen=True)
class DocEdit:
    """One edit: at code point ``at`` of the text at that moment, delete ``delete``
    code points, then insert ``insert``."""

    at: int
    delete: int = 0
    insert: str = ""

    def to_json(self) -> JSON:
        body: JSON = {"at": self.at}
        if self.delete:
            body["delete"] = self.delete
        if self.insert:
            body["insert"] = self.insert
        return body


# Whole-document writes (set_doc, append_doc) read the version, then write with it; when
# someone else's change lands in between, they read again, at most this many times.
DOC_ATTEMPTS = 5


def _edits_body(edits: Sequence[DocEdit | JSON], version: int | None) -> JSON:
    body: JSON = {"edits": [e.to_json() if isinstance(e, DocEdit) else dict(e) for e in edits]}
    if version is not None:
        body["version"] = version
    return body


def _replace_edits(current: Document, text: str) -> list[DocEdit]:
    """``text`` in place of ``current``'s, as the smallest edit: what both share at the
    start and the end stays (an editor's cursor there does not jump)."""
    old = current.text
    start = 0
    while start < min(len(old), len(text)) and old[start] == text[start]:
        start += 1
    end = 0
    while end < min(len(old), len(text)) - start and old[-1 - end] == text[-1 - end]:
        end += 1
    return [DocEdit(start, len(old) - start - end, text[start:len(text) - end])]


def _append_edits(current: Document, text: str) -> list[DocEdit]:
    """``text`` as a new paragraph: after a blank line, unless the document is blank or
    already ends with one (the rule the server's agent uses)."""
    body = current.text
    if not body.strip() or body.endswith("\n\n"):
        return [DocEdit(len(body), 0, text)]
    return [DocEdit(len(body), 0, ("\n" if body.endswith("\n") else "\n\n") + text)]


def _version_conflict(exc: TandemError) -> bool:
    return isinstance(exc, ConflictError) and exc.code == "version_conflict"


EXPORT_FORMATS = ("markdown", "json")


def _fork_body(message_id: str | None, title: str | None) -> JSON:
    return {k: v for k, v in {"message_id": message_id, "title": title}.items() if v is not None}


@dataclass(frozen=True)
class PostedMessage:
    """A posted message and its reply's id; or, posted while a reply ran, ``queued`` with
    its ``position`` (1 = next) and no reply yet: its reply starts when its turn comes
    (``message.updated``, then the assistant's ``message.created``)."""

    message: Message
    reply_id: str | None
    queued: bool = False
    position: int | None = None


IF_BUSY = ("queue", "reject", "interrupt")


@dataclass(frozen=True)
class Permission:
    id: str
    session_id: str
    message_id: str
    call_id: str | None
    tool: str
    input: Any
    status: str  # "pending" | "approved" | "rejected" | "expired"
    created_at: str
    expires_at: str
    resolved_by: User | str | None  # a user, or "timeout"
    approved: bool | None
    reason: str | None
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Permission:
        by = data.get("resolved_by")
        return cls(
            id=data["id"], session_id=data.get("session_id", ""), message_id=data.get("message_id", ""),
            call_id=data.get("call_id"), tool=data.get("tool", ""), input=data.get("input"),
            status=data.get("status", ""), created_at=data.get("created_at", ""),
            expires_at=data.get("expires_at", ""), resolved_by=_user(by) or by, approved=data.get("approved"),
            reason=data.get("reason"), raw=data,
        )


@dataclass(frozen=True)
class Member:
    user: User
    role: str

    @classmethod
    def from_json(cls, data: JSON) -> Member:
        return cls(user=User.from_json(data["user"]), role=data["role"])


@dataclass(frozen=True)
class Event:
    """The envelope of PROTOCOL.md §4. ``seq`` is ``None`` for ephemeral events."""

    seq: int | None
    session_id: str | None
    type: str
    time: str
    properties: JSON
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: JSON) -> Event:
        return cls(
            seq=data.get("seq"), session_id=data.get("session_id"), type=data["type"],
            time=data.get("time", ""), properties=data.get("properties") or {}, raw=data,
        )


@dataclass(frozen=True)
class EventPage:
    events: list[Event]
    last_seq: int
    reset: bool  # the events after ``after`` were pruned, or ``after`` is beyond the head


@dataclass(frozen=True)
class Tokens:
    access: str
    refresh: str | None


def _posted(data: JSON) -> PostedMessage:
    return PostedMessage(
        message=Message.from_json(data["message"]), reply_id=data.get("reply_id"),
        queued=bool(data.get("queued")), position=data.get("position"),
    )


def _post_body(text: str | Sequence[str], if_busy: str | None) -> JSON:
    body: JSON = {"parts": _text_parts(text)}
    if if_busy is not None:
        if if_busy not in IF_BUSY:
            raise ValueError(f"if_busy must be one of {IF_BUSY}, not {if_busy!r}")
        body["if_busy"] = if_busy
    return body


def _page(data: JSON) -> EventPage:
    return EventPage([Event.from_json(e) for e in data["events"]], int(data["last_seq"]), bool(data["reset"]))


def _s(session_id: str, *rest: str) -> str:
    # Ids are opaque: quote them so no id can step out of its path segment.
    return "/".join(["/api/sessions", quote(session_id, safe=""), *(quote(r, safe="") for r in rest)]) + "/"


def _text_parts(text: str | Sequence[str]) -> list[JSON]:
    texts = [text] if isinstance(text, str) else list(text)
    return [{"type": "text", "text": t} for t in texts]


def _normalize_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkError(0, "invalid_url", f"Not a server URL: {url!r} (expected http://host:port)")
    return url.strip().rstrip("/")


# ---------------------------------------------------------------- streams: the shared state machine

_CONNECTED, _EXPIRED, _END = "connected", "expired", "end"


class _StreamState:
    """Position, de-duplication and backoff of one logical stream across connections."""

    def __init__(
        self, session_id: str, after: int | None, types: str | Sequence[str] | None,
        on_reset: Callable[[Event], Any] | None, heartbeats: bool, max_retries: int | None,
        backoff: tuple[float, float],
    ) -> None:
        self.path = _s(session_id, "stream")
        self.last_seq = after
        self.types = types if isinstance(types, str) or types is None else ",".join(types)
        self.on_reset = on_reset
        self.heartbeats = heartbeats
        self.max_retries = max_retries
        self.base, self.cap = backoff
        self.failures = 0

    def request(self) -> tuple[dict[str, str], dict[str, str]]:
        params = {"types": self.types} if self.types else {}
        headers = {"Last-Event-ID": str(self.last_seq)} if self.last_seq is not None else {}
        return params, headers

    def feed(self, sse: ServerSentEvent) -> tuple[Event | None, str | None]:
        if not sse.data:
            return None, None  # the `retry:` preamble
        event = Event.from_json(json.loads(sse.data))
        props = event.properties
        if event.type == "server.connected":
            self.failures = 0
            if self.last_seq is None and not props.get("resumed"):
                self.last_seq = props.get("last_seq")  # live from here on
            return event, _CONNECTED
        if event.type == "server.heartbeat":
            return (event if self.heartbeats else None), None
        if event.type == "auth.expired":
            return None, _EXPIRED  # transport business: refresh and resume, the caller sees nothing
        if event.type == "stream.reset":
            self.last_seq = props.get("last_seq", self.last_seq)
            if self.on_reset is not None:
                self.on_reset(event)
            return event, None
        if event.type == "session.deleted":
            return event, _END
        if event.seq is not None:
            if self.last_seq is not None and event.seq <= self.last_seq:
                return None, None  # already delivered before a reconnect
            self.last_seq = event.seq
        return event, None

    def next_delay(self, error: BaseException | None, retry_after: float | None = None) -> float:
        """Seconds to wait before reconnecting (exponential with jitter), or raise when the
        retries are used up."""
        self.failures += 1
        if self.max_retries is not None and self.failures > self.max_retries:
            if isinstance(error, TandemError):
                raise error
            raise NetworkError(0, "network_error", f"Stream lost and not recovered: {error}") from error
        ceiling = min(self.cap, self.base * 2 ** (self.failures - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: clients dropped together do not return together
        log.info("stream %s: reconnecting in %.2fs after %r", self.path, delay, error)
        return float(max(delay, retry_after or 0.0))


def _transient(exc: TandemError) -> bool:
    return isinstance(exc, (RateLimitedError, ServerError))


# ---------------------------------------------------------------- the shared client state


class _Base:
    def __init__(
        self, url: str, *, access: str | None, refresh: str | None, username: str | None,
        password: str | None, timeout: float, read_timeout: float,
        on_tokens: Callable[[Tokens], Any] | None,
    ) -> None:
        self.url = _normalize_url(url)
        self.access = access
        self.refresh_token = refresh
        self.username = username
        self._password = password
        self.timeout = timeout
        # Heartbeats come every 15 s of silence by default: three missed ones mean a dead connection.
        self.stream_timeout = httpx.Timeout(timeout, read=read_timeout)
        self.on_tokens = on_tokens

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}

    def _can_reauth(self) -> bool:
        return bool(self.refresh_token or (self.username and self._password))

    def _store(self, data: JSON) -> Tokens:
        self.access = data["access"]
        self.refresh_token = data.get("refresh", self.refresh_token)
        tokens = Tokens(self.access, self.refresh_token)
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        return tokens

    def _not_logged_in(self) -> AuthenticationError:
        return AuthenticationError(401, "not_authenticated", "Not logged in: no access token, refresh token or password.")

    def _stream_state(
        self, session_id: str, after: int | None, types: str | Sequence[str] | None,
        on_reset: Callable[[Event], Any] | None, heartbeats: bool, max_retries: int | None,
        backoff: tuple[float, float],
    ) -> _StreamState:
        return _StreamState(session_id, after, types, on_reset, heartbeats, max_retries, backoff)


# How often one call may re-authenticate: an access token can expire between the refresh
# and its use when tokens are very short-lived.
_AUTH_ATTEMPTS = 3


class Client(_Base):
    """Synchronous client. Give it tokens, or a username and password (it logs in when
    first needed), or call :meth:`login`. ``on_tokens`` is called with new tokens.

        with Client("http://127.0.0.1:8000", username="ada", password="…") as tandem:
            session = tandem.create_session("Fix the login bug")
            for event in tandem.stream(session.id, after=0):
                ...
    """

    def __init__(
        self, url: str, *, access: str | None = None, refresh: str | None = None,
        username: str | None = None, password: str | None = None, timeout: float = 15.0,
        read_timeout: float = 50.0, on_tokens: Callable[[Tokens], Any] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, access=access, refresh=refresh, username=username, password=password,
                         timeout=timeout, read_timeout=read_timeout, on_tokens=on_tokens)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": "tandem-client"})
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------ auth

    def login(self, username: str, password: str) -> Tokens:
        """Exchange a username and password for tokens (kept for later calls)."""
        data = self._send("POST", "/api/auth/token/", json={"username": username, "password": password}, auth=False).json()
        self.username, self._password = username, password
        return self._store(data)

    def refresh(self, stale: str | None = None) -> Tokens:
        """Get a new access token (from the refresh token, else by logging in again). With
        ``stale``, does nothing if another thread already replaced that token."""
        with self._lock:
            if stale is not None and self.access != stale and self.access is not None:
                return Tokens(self.access, self.refresh_token)
            if self.refresh_token:
                try:
                    data = self._send("POST", "/api/auth/token/refresh/", json={"refresh": self.refresh_token}, auth=False).json()
                    return self._store(data)
                except AuthenticationError:
                    if not (self.username and self._password):
                        raise AuthenticationError(401, "authentication_failed", "The saved login has expired: log in again.") from None
            if self.username and self._password:
                credentials = {"username": self.username, "password": self._password}
                data = self._send("POST", "/api/auth/token/", json=credentials, auth=False).json()
                return self._store(data)
            raise self._not_logged_in()

    def register(self, username: str, password: str) -> User:
        credentials = {"username": username, "password": password}
        return User.from_json(self._send("POST", "/api/auth/register/", json=credentials, auth=False).json())

    def ticket(self) -> str:
        """A short-lived ``?ticket=`` for stream URLs (browsers; this client uses its token)."""
        return str(self._call("POST", "/api/auth/ticket/", json={})["ticket"])

    # ------------------------------------------------------------ transport

    def _send(self, method: str, path: str, *, json: Any = None, params: Any = None, auth: bool = True) -> httpx.Response:
        for _ in range(_AUTH_ATTEMPTS):
            if auth and self.access is None:
                self.refresh()
            used = self.access
            try:
                response = self._http.request(method, path, json=json, params=params,
                                              headers=self._auth_headers() if auth else None)
            except (httpx.TransportError, httpx.InvalidURL) as exc:
                raise _network_error(self.url, exc) from exc
            if response.status_code == 401 and auth and self._can_reauth():
                self.refresh(stale=used)
                continue
            if response.is_error:
                raise _error_from(response)
            return response
        raise _error_from(response)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def _all(self, path: str, params: dict[str, Any] | None = None) -> list[JSON]:
        items: list[JSON] = []
        url: str | None = path
        while url:
            page = self._call("GET", url, params=params)
            items += page["results"]
            url, params = page.get("next"), None  # `next` carries its own query
        return items

    # ------------------------------------------------------------ sessions

    def list_sessions(self) -> list[Session]:
        return [Session.from_json(s) for s in self._all("/api/sessions/")]

    def create_session(self, title: str | None = None, agent: str | None = None) -> Session:
        body = {k: v for k, v in {"title": title, "agent": agent}.items() if v is not None}
        return Session.from_json(self._call("POST", "/api/sessions/", json=body))

    def get_session(self, session_id: str) -> Session:
        return Session.from_json(self._call("GET", _s(session_id)))

    def rename_session(self, session_id: str, title: str) -> Session:
        return Session.from_json(self._call("PATCH", _s(session_id), json={"title": title}))

    def delete_session(self, session_id: str) -> None:
        self._call("DELETE", _s(session_id))

    def health(self, session_id: str) -> JSON:
        return self._call("GET", _s(session_id, "health"))  # type: ignore[no-any-return]

    def members(self, session_id: str) -> list[Member]:
        return [Member.from_json(m) for m in self._call("GET", _s(session_id, "members"))]

    def add_member(self, session_id: str, username: str, role: str) -> Member:
        return Member.from_json(self._call("POST", _s(session_id, "members"), json={"username": username, "role": role}))

    def remove_member(self, session_id: str, username: str) -> None:
        self._call("DELETE", _s(session_id, "members", username))

    def fork_session(self, session_id: str, message_id: str | None = None, title: str | None = None) -> Session:
        """A new session of yours holding the messages up to ``message_id`` (default: all ended ones)."""
        return Session.from_json(self._call("POST", _s(session_id, "fork"), json=_fork_body(message_id, title)))

    def export(self, session_id: str, format: str = "markdown") -> str:
        """The session as a Markdown transcript, or (``format="json"``) its JSON text."""
        return self._send("GET", _s(session_id, "export"), params={"format": format}).text

    def export_json(self, session_id: str) -> JSON:
        """``{"session", "members", "messages", "permissions"}``."""
        return json.loads(self.export(session_id, "json"))  # type: ignore[no-any-return]

    def search(self, q: str, max_results: int = 50) -> list[SearchHit]:
        """Best match first, across the sessions you belong to."""
        hits: list[SearchHit] = []
        url: str | None = "/api/search/"
        params: JSON | None = {"q": q, "limit": min(max_results, 100)}
        while url and len(hits) < max_results:
            page = self._call("GET", url, params=params)
            hits += [SearchHit.from_json(h) for h in page["results"]]
            url, params = page.get("next"), None
        return hits[:max_results]

    # ------------------------------------------------------------ messages and permissions

    def messages(self, session_id: str) -> list[Message]:
        return [Message.from_json(m) for m in self._all(_s(session_id, "messages"))]

    def send_message(
        self, session_id: str, text: str | Sequence[str], *, if_busy: str | None = None
    ) -> PostedMessage:
        """Post a user message (one text part per string); the agent's reply streams as
        events. While a reply runs, ``if_busy`` says what happens: ``"queue"`` (the
        server's default: ``queued`` is true and the reply comes in turn), ``"reject"``
        (:class:`ConflictError` ``session_busy``) or ``"interrupt"`` (the running reply
        is cancelled and this message answered next)."""
        return _posted(self._call("POST", _s(session_id, "messages"), json=_post_body(text, if_busy)))

    def withdraw_message(self, session_id: str, message_id: str) -> None:
        """Take a queued message out of the queue (its author or an owner); a message no
        longer queued is :class:`ConflictError` ``not_queued``."""
        self._call("DELETE", _s(session_id, "messages", message_id))

    def retry(self, session_id: str, message_id: str) -> str:
        """A new reply in place of the session's latest one (``message_id``), which stays,
        marked ``superseded_by``. Returns the new reply's id."""
        return str(self._call("POST", _s(session_id, "messages", message_id, "retry"), json={})["reply_id"])

    def abort(self, session_id: str) -> bool:
        """Stop the running reply; True if one was running."""
        return bool(self._call("POST", _s(session_id, "abort"), json={})["aborted"])

    def permissions(self, session_id: str, status: str | None = None) -> list[Permission]:
        params = {"status": status} if status else None
        return [Permission.from_json(p) for p in self._call("GET", _s(session_id, "permissions"), params=params)]

    def answer_permission(self, session_id: str, permission_id: str, approved: bool, reason: str | None = None) -> Permission:
        body: JSON = {"approved": approved, **({"reason": reason} if reason is not None else {})}
        return Permission.from_json(self._call("POST", _s(session_id, "permissions", permission_id), json=body))

    # ------------------------------------------------------------ the shared document

    def get_doc(self, session_id: str) -> Document:
        """The session's shared document (any member)."""
        return Document.from_json(self._call("GET", _s(session_id, "doc")))

    def edit_doc(self, session_id: str, edits: Sequence[DocEdit | JSON], version: int | None = None) -> Document:
        """Apply ``edits`` in order, as one change (editors and owners). With ``version``,
        :class:`ConflictError` ``version_conflict`` if the document has moved on since;
        :class:`ValidationError` for a position out of range."""
        return Document.from_json(self._call("PATCH", _s(session_id, "doc"), json=_edits_body(edits, version)))

    def set_doc(self, session_id: str, text: str, *, version: int | None = None) -> Document:
        """Replace the whole text. With ``version``, only if the document is still at it
        (else ``version_conflict``); without, whatever it is now (re-read and retried when
        a change lands between the read and the write)."""
        return self._write_doc(session_id, lambda current: _replace_edits(current, text), version)

    def append_doc(self, session_id: str, text: str) -> Document:
        """Add ``text`` as a new paragraph at the end."""
        return self._write_doc(session_id, lambda current: _append_edits(current, text), None)

    def _write_doc(self, session_id: str, edits_for: Callable[[Document], list[DocEdit]], version: int | None) -> Document:
        for attempt in range(1, DOC_ATTEMPTS + 1):
            current = self.get_doc(session_id)
            try:
                return self.edit_doc(session_id, edits_for(current), current.version if version is None else version)
            except ConflictError as exc:
                if version is not None or not _version_conflict(exc) or attempt == DOC_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ events

    def events(self, session_id: str, after: int = 0, limit: int | None = None, types: str | Sequence[str] | None = None) -> EventPage:
        params: JSON = {"after": after}
        if limit is not None:
            params["limit"] = limit
        if types:
            params["types"] = types if isinstance(types, str) else ",".join(types)
        return _page(self._call("GET", _s(session_id, "events"), params=params))

    def publish(self, session_id: str, type: str, properties: JSON | None = None) -> Event:
        return Event.from_json(self._call("POST", _s(session_id, "events"), json={"type": type, "properties": properties or {}}))

    def stream(
        self, session_id: str, *, after: int | None = None, types: str | Sequence[str] | None = None,
        on_reset: Callable[[Event], Any] | None = None, heartbeats: bool = False,
        max_retries: int | None = None, backoff: tuple[float, float] = (0.25, 10.0),
    ) -> EventStream:
        """The session's events over SSE, as an iterator that outlives connections.

        ``after=None`` starts live; ``after=N`` first replays every event after seq N
        (0 = from the start). Each connection starts with a ``server.connected`` event;
        persisted events come in seq order, each once. ``stream.reset`` (the position
        could not be resumed: refetch state) is yielded and passed to ``on_reset``.
        Drops reconnect with exponential backoff and jitter (``backoff=(first, max)``
        seconds, forever unless ``max_retries``); ``auth.expired`` is handled by refreshing
        the token. The iterator ends after ``session.deleted``."""
        return EventStream(self, self._stream_state(session_id, after, types, on_reset, heartbeats, max_retries, backoff))

    @contextmanager
    def _connect(self, state: _StreamState) -> Iterator[EventSource]:
        for _ in range(_AUTH_ATTEMPTS):
            if self.access is None:
                self.refresh()
            used = self.access
            params, headers = state.request()
            with connect_sse(self._http, "GET", state.path, params=params, timeout=self.stream_timeout,
                             headers={**headers, **self._auth_headers()}) as source:
                response = source.response
                if response.status_code == 401 and self._can_reauth():
                    self.refresh(stale=used)
                    continue
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                yield source
                return
        raise AuthenticationError(401, "authentication_failed", "The server keeps refusing fresh tokens.")


class EventStream:
    """What :meth:`Client.stream` returns: iterate it; ``close()`` (or ``with``) ends it.
    ``last_seq`` is the position a reconnect resumes from."""

    def __init__(self, client: Client, state: _StreamState) -> None:
        self._client = client
        self._state = state
        self._events = self._run()

    @property
    def last_seq(self) -> int | None:
        return self._state.last_seq

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._events.close()

    def _run(self) -> Generator[Event, None, None]:
        state = self._state
        while True:
            action: str | None = None
            retry_after: float | None = None
            error: BaseException | None = None
            try:
                with self._client._connect(state) as source:
                    for sse in source.iter_sse():
                        event, action = state.feed(sse)
                        if event is not None:
                            yield event
                        if action in (_EXPIRED, _END):
                            break
            except (httpx.TransportError, SSEError) as exc:
                error = exc
            except TandemError as exc:
                if not _transient(exc):
                    raise
                error, retry_after = exc, getattr(exc, "retry_after", None)
            if action == _END:
                return
            if action == _EXPIRED:
                self._client.refresh()
                continue  # at once: nothing is wrong with the server
            time.sleep(state.next_delay(error or EOFError("the server ended the stream"), retry_after))


# ---------------------------------------------------------------- asyncio


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: the same methods, awaited; ``stream()`` is
    an async iterator (``async for event in tandem.stream(sid): …``)."""

    def __init__(
        self, url: str, *, access: str | None = None, refresh: str | None = None,
        username: str | None = None, password: str | None = None, timeout: float = 15.0,
        read_timeout: float = 50.0, on_tokens: Callable[[Tokens], Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, access=access, refresh=refresh, username=username, password=password,
                         timeout=timeout, read_timeout=read_timeout, on_tokens=on_tokens)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport,
                                       headers={"User-Agent": "tandem-client"})
        self._lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def login(self, username: str, password: str) -> Tokens:
        data = (await self._send("POST", "/api/auth/token/", json={"username": username, "password": password}, auth=False)).json()
        self.username, self._password = username, password
        return self._store(data)

    async def refresh(self, stale: str | None = None) -> Tokens:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if stale is not None and self.access != stale and self.access is not None:
                return Tokens(self.access, self.refresh_token)
            if self.refresh_token:
                try:
                    response = await self._send("POST", "/api/auth/token/refresh/", json={"refresh": self.refresh_token}, auth=False)
                    return self._store(response.json())
                except AuthenticationError:
                    if not (self.username and self._password):
                        raise AuthenticationError(401, "authentication_failed", "The saved login has expired: log in again.") from None
            if self.username and self._password:
                credentials = {"username": self.username, "password": self._password}
                response = await self._send("POST", "/api/auth/token/", json=credentials, auth=False)
                return self._store(response.json())
            raise self._not_logged_in()

    async def register(self, username: str, password: str) -> User:
        response = await self._send("POST", "/api/auth/register/", json={"username": username, "password": password}, auth=False)
        return User.from_json(response.json())

    async def ticket(self) -> str:
        return str((await self._call("POST", "/api/auth/ticket/", json={}))["ticket"])

    async def _send(self, method: str, path: str, *, json: Any = None, params: Any = None, auth: bool = True) -> httpx.Response:
        for _ in range(_AUTH_ATTEMPTS):
            if auth and self.access is None:
                await self.refresh()
            used = self.access
            try:
                response = await self._http.request(method, path, json=json, params=params,
                                                    headers=self._auth_headers() if auth else None)
            except (httpx.TransportError, httpx.InvalidURL) as exc:
                raise _network_error(self.url, exc) from exc
            if response.status_code == 401 and auth and self._can_reauth():
                await self.refresh(stale=used)
                continue
            if response.is_error:
                raise _error_from(response)
            return response
        raise _error_from(response)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        return response.json() if response.content else None

    async def _all(self, path: str, params: dict[str, Any] | None = None) -> list[JSON]:
        items: list[JSON] = []
        url: str | None = path
        while url:
            page = await self._call("GET", url, params=params)
            items += page["results"]
            url, params = page.get("next"), None
        return items

    async def list_sessions(self) -> list[Session]:
        return [Session.from_json(s) for s in await self._all("/api/sessions/")]

    async def create_session(self, title: str | None = None, agent: str | None = None) -> Session:
        body = {k: v for k, v in {"title": title, "agent": agent}.items() if v is not None}
        return Session.from_json(await self._call("POST", "/api/sessions/", json=body))

    async def get_session(self, session_id: str) -> Session:
        return Session.from_json(await self._call("GET", _s(session_id)))

    async def rename_session(self, session_id: str, title: str) -> Session:
        return Session.from_json(await self._call("PATCH", _s(session_id), json={"title": title}))

    async def delete_session(self, session_id: str) -> None:
        await self._call("DELETE", _s(session_id))

    async def health(self, session_id: str) -> JSON:
        return await self._call("GET", _s(session_id, "health"))  # type: ignore[no-any-return]

    async def members(self, session_id: str) -> list[Member]:
        return [Member.from_json(m) for m in await self._call("GET", _s(session_id, "members"))]

    async def add_member(self, session_id: str, username: str, role: str) -> Member:
        return Member.from_json(await self._call("POST", _s(session_id, "members"), json={"username": username, "role": role}))

    async def fork_session(self, session_id: str, message_id: str | None = None, title: str | None = None) -> Session:
        return Session.from_json(await self._call("POST", _s(session_id, "fork"), json=_fork_body(message_id, title)))

    async def export(self, session_id: str, format: str = "markdown") -> str:
        return (await self._send("GET", _s(session_id, "export"), params={"format": format})).text

    async def export_json(self, session_id: str) -> JSON:
        return json.loads(await self.export(session_id, "json"))  # type: ignore[no-any-return]

    async def search(self, q: str, max_results: int = 50) -> list[SearchHit]:
        hits: list[SearchHit] = []
        url: str | None = "/api/search/"
        params: JSON | None = {"q": q, "limit": min(max_results, 100)}
        while url and len(hits) < max_results:
            page = await self._call("GET", url, params=params)
            hits += [SearchHit.from_json(h) for h in page["results"]]
            url, params = page.get("next"), None
        return hits[:max_results]

    async def remove_member(self, session_id: str, username: str) -> None:
        await self._call("DELETE", _s(session_id, "members", username))

    async def messages(self, session_id: str) -> list[Message]:
        return [Message.from_json(m) for m in await self._all(_s(session_id, "messages"))]

    async def send_message(
        self, session_id: str, text: str | Sequence[str], *, if_busy: str | None = None
    ) -> PostedMessage:
        return _posted(await self._call("POST", _s(session_id, "messages"), json=_post_body(text, if_busy)))

    async def withdraw_message(self, session_id: str, message_id: str) -> None:
        await self._call("DELETE", _s(session_id, "messages", message_id))

    async def retry(self, session_id: str, message_id: str) -> str:
        return str((await self._call("POST", _s(session_id, "messages", message_id, "retry"), json={}))["reply_id"])

    async def abort(self, session_id: str) -> bool:
        return bool((await self._call("POST", _s(session_id, "abort"), json={}))["aborted"])

    async def permissions(self, session_id: str, status: str | None = None) -> list[Permission]:
        params = {"status": status} if status else None
        return [Permission.from_json(p) for p in await self._call("GET", _s(session_id, "permissions"), params=params)]

    async def answer_permission(self, session_id: str, permission_id: str, approved: bool, reason: str | None = None) -> Permission:
        body: JSON = {"approved": approved, **({"reason": reason} if reason is not None else {})}
        return Permission.from_json(await self._call("POST", _s(session_id, "permissions", permission_id), json=body))

    async def get_doc(self, session_id: str) -> Document:
        return Document.from_json(await self._call("GET", _s(session_id, "doc")))

    async def edit_doc(self, session_id: str, edits: Sequence[DocEdit | JSON], version: int | None = None) -> Document:
        return Document.from_json(await self._call("PATCH", _s(session_id, "doc"), json=_edits_body(edits, version)))

    async def set_doc(self, session_id: str, text: str, *, version: int | None = None) -> Document:
        return await self._write_doc(session_id, lambda current: _replace_edits(current, text), version)

    async def append_doc(self, session_id: str, text: str) -> Document:
        return await self._write_doc(session_id, lambda current: _append_edits(current, text), None)

    async def _write_doc(
        self, session_id: str, edits_for: Callable[[Document], list[DocEdit]], version: int | None
    ) -> Document:
        for attempt in range(1, DOC_ATTEMPTS + 1):
            current = await self.get_doc(session_id)
            try:
                return await self.edit_doc(session_id, edits_for(current), current.version if version is None else version)
            except ConflictError as exc:
                if version is not None or not _version_conflict(exc) or attempt == DOC_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def events(
        self, session_id: str, after: int = 0, limit: int | None = None, types: str | Sequence[str] | None = None
    ) -> EventPage:
        params: JSON = {"after": after}
        if limit is not None:
            params["limit"] = limit
        if types:
            params["types"] = types if isinstance(types, str) else ",".join(types)
        return _page(await self._call("GET", _s(session_id, "events"), params=params))

    async def publish(self, session_id: str, type: str, properties: JSON | None = None) -> Event:
        return Event.from_json(await self._call("POST", _s(session_id, "events"), json={"type": type, "properties": properties or {}}))

    def stream(
        self, session_id: str, *, after: int | None = None, types: str | Sequence[str] | None = None,
        on_reset: Callable[[Event], Any] | None = None, heartbeats: bool = False,
        max_retries: int | None = None, backoff: tuple[float, float] = (0.25, 10.0),
    ) -> AsyncEventStream:
        """As :meth:`Client.stream`, as an async iterator."""
        return AsyncEventStream(self, self._stream_state(session_id, after, types, on_reset, heartbeats, max_retries, backoff))

    @asynccontextmanager
    async def _connect(self, state: _StreamState) -> AsyncIterator[EventSource]:
        for _ in range(_AUTH_ATTEMPTS):
            if self.access is None:
                await self.refresh()
            used = self.access
            params, headers = state.request()
            async with aconnect_sse(self._http, "GET", state.path, params=params, timeout=self.stream_timeout,
                                    headers={**headers, **self._auth_headers()}) as source:
                response = source.response
                if response.status_code == 401 and self._can_reauth():
                    await self.refresh(stale=used)
                    continue
                if response.is_error:
                    await response.aread()
                    raise _error_from(response)
                yield source
                return
        raise AuthenticationError(401, "authentication_failed", "The server keeps refusing fresh tokens.")


class AsyncEventStream:
    """What :meth:`AsyncClient.stream` returns: ``async for`` it; ``aclose()`` ends it."""

    def __init__(self, client: AsyncClient, state: _StreamState) -> None:
        self._client = client
        self._state = state
        self._events = self._run()

    @property
    def last_seq(self) -> int | None:
        return self._state.last_seq

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def _run(self) -> AsyncGenerator[Event, None]:
        state = self._state
        while True:
            action: str | None = None
            retry_after: float | None = None
            error: BaseException | None = None
            try:
                async with self._client._connect(state) as source:
                    async for sse in source.aiter_sse():
                        event, action = state.feed(sse)
                        if event is not None:
                            yield event
                        if action in (_EXPIRED, _END):
                            break
            except (httpx.TransportError, SSEError) as exc:
                error = exc
            except TandemError as exc:
                if not _transient(exc):
                    raise
                error, retry_after = exc, getattr(exc, "retry_after", None)
            if action == _END:
                return
            if action == _EXPIRED:
                await self._client.refresh()
                continue
            await asyncio.sleep(state.next_delay(error or EOFError("the server ended the stream"), retry_after))
