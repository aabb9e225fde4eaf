"""Per-user limits (PROTOCOL §8): the write rate, and the number of open streams.

Both are counted where every server process can see them: in Redis when ``REDIS_URL``
is set, in this process otherwise (on its runtime). Stream slots carry their own expiry
and are renewed by the process holding them, so the slots of a killed process free
themselves.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from rest_framework.throttling import BaseThrottle

from project import liveness, redisconn, runtime
from project.batch import Batcher
from project.errors import RateLimited, TooManyConnections, Unavailable
from project.rates import parse_rate

# ---------------------------------------------------------------- the write rate


def _prefix() -> str:
    # The channel layer's prefix: deployments (and test runs) sharing one Redis keep apart.
    return str(settings.TANDEM_CHANNEL_PREFIX)


class _LocalCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}

    def hit(self, key: str, ttl: int) -> int:
        now = time.time()
        with self._lock:
            if len(self._counts) > 10_000:  # drop ended windows now and then
                self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
            count, expires = self._counts.get(key, (0, now + ttl))
            if expires <= now:
                count, expires = 0, now + ttl
            self._counts[key] = (count + 1, expires)
            return count + 1


class _RedisCounter:
    def __init__(self, url: str) -> None:
        self._redis = redisconn.client(url, socket_timeout=2, socket_connect_timeout=2)

    def hit(self, key: str, ttl: int) -> int:
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, ttl, nx=True)
        count, _ = pipe.execute()
        return int(count)


def _count(key: str, rate_setting: str, what: str) -> None:
    """Count one hit on ``key`` against a rate such as ``120/min``; RateLimited (with
    Retry-After) past it. A fixed window: one atomic increment, the same on every process."""
    rate = parse_rate(rate_setting)
    if rate is None:
        return
    allowed, period = rate
    now = time.time()
    window = int(now // period)
    try:
        count = STATE.get().counter.hit(f"{key}:{window}", period + 1)
    except Exception:  # Redis down: serve rather than refuse every request
        return
    if count > allowed:
        wait = max(1, math.ceil((window + 1) * period - now))
        raise RateLimited(
            f"Too many {what}; retry in {wait} s.", headers={"Retry-After": str(wait)},
            details={"retry_after": wait},
        )


def check_write_rate(user_id: int) -> None:
    """Count one write by ``user_id``; RateLimited (with Retry-After) past the rate."""
    _count(f"{_prefix()}:rate:{user_id}", settings.TANDEM_RATE_WRITE, "writes")


class WriteThrottle:
    """DRF throttle for REST writes (not ``/api/auth/``); raises the error itself so
    Retry-After is whole seconds, rounded up."""

    def allow_request(self, request: object, view: object) -> bool:
        method = getattr(request, "method", "GET")
        path = getattr(request, "path", "")
        user = getattr(request, "user", None)
        if method in ("GET", "HEAD", "OPTIONS") or path.startswith("/api/auth/"):
            return True
        if user is None or not user.is_authenticated:
            return True  # refused by authentication, not counted
        check_write_rate(user.pk)
        return True

    def wait(self) -> float | None:
        return None



# ---------------------------------------------------------------- sign-in endpoints


def client_ip(meta: dict[str, Any]) -> str:
    """The client's address: ``REMOTE_ADDR``, unless that is one of
    TANDEM_TRUSTED_PROXIES, then the right-most ``X-Forwarded-For`` entry that is not.
    Only the right end of that header can be trusted: a proxy appends the address it saw
    and keeps whatever the client sent before it."""
    remote = str(meta.get("REMOTE_ADDR") or "")
    if not _trusted(remote):
        return remote
    hops = [h.strip() for h in str(meta.get("HTTP_X_FORWARDED_FOR", "")).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop):
            return hop[:64]
    return hops[0][:64] if hops else remote


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _trusted_networks(tuple(settings.TANDEM_TRUSTED_PROXIES)))


@functools.lru_cache(maxsize=4)
def _trusted_networks(values: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _digest(value: str) -> str:
    # Keys of bounded size whatever a client sends as a username.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def check_sign_in_rate(bucket: str, meta: dict[str, Any], account: str | None) -> None:
    """Count one sign-in request in ``bucket`` per client address (TANDEM_RATE_AUTH_IP)
    and, when known, per account (TANDEM_RATE_AUTH_USER); RateLimited past either.
    Tickets count at TANDEM_RATE_TICKET instead: their caller is already signed in, and
    every stream a page opens or reopens takes one."""
    if bucket == "ticket":
        ip_rate = user_rate = settings.TANDEM_RATE_TICKET
    else:
        ip_rate, user_rate = settings.TANDEM_RATE_AUTH_IP, settings.TANDEM_RATE_AUTH_USER
    what = "ticket requests" if bucket == "ticket" else "sign-in requests"
    base = f"{_prefix()}:auth:{bucket}"
    _count(f"{base}:ip:{_digest(client_ip(meta))}", ip_rate, what)
    if account is not None:
        _count(f"{base}:user:{_digest(account)}", user_rate, what)


# Every form that checks a password shares one bucket, so the pages add no guesses to
# the API's.
_BUCKETS = {"token": "password", "refresh": "refresh", "register": "register", "ticket": "ticket"}


class AuthThrottle(BaseThrottle):
    """The sign-in endpoints (token, refresh, register, ticket): per client address at
    TANDEM_RATE_AUTH_IP and per account at TANDEM_RATE_AUTH_USER, counted per kind of
    request so that, say, failed logins never use up the tickets of a signed-in user. The
    account is the username sent (whether or not it exists, so the limit leaks nothing),
    the user of a valid refresh token, or the caller."""

    def allow_request(self, request: Any, view: Any) -> bool:
        endpoint = request.path.rstrip("/").rsplit("/", 1)[-1]
        check_sign_in_rate(_BUCKETS.get(endpoint, endpoint), request.META, self._account(request))
        return True

    @staticmethod
    def _account(request: Any) -> str | None:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return f"id:{user.pk}"
        data = request.data
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("username"), str):
            return f"name:{data['username']}"
        if isinstance(data.get("refresh"), str):
            from rest_framework_simplejwt.exceptions import TokenError
            from rest_framework_simplejwt.tokens import RefreshToken

            try:  # only a genuine token counts against its user, or anyone could lock them out
                return f"id:{RefreshToken(data['refresh'])['user_id']}"
            except (TokenError, KeyError):
                return None
        return None

    def wait(self) -> float | None:
        return None


def sign_in_throttled(bucket: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The same limits for the HTML forms that take a password (the login pages, the
    sign-up page): a POST past them gets a plain 429 page with Retry-After."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def throttled(request: Any, *args: Any, **kwargs: Any) -> Any:
            if request.method == "POST":
                username = request.POST.get("username")
                try:
                    check_sign_in_rate(bucket, request.META, f"name:{username}" if username else None)
                except RateLimited as err:
                    from django.http import HttpResponse

                    response = HttpResponse(f"{err.message}\n", status=429, content_type="text/plain; charset=utf-8")
                    response["Retry-After"] = err.headers["Retry-After"]
                    return response
            return view(request, *args, **kwargs)

        return throttled

    return decorate


# ---------------------------------------------------------------- open streams


class _LocalSlots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[int, set[str]] = {}

    def take(self, user_id: int, slot: str, limit: int, ttl: float) -> bool:
        with self._lock:
            slots = self._users.setdefault(user_id, set())
            if len(slots) >= limit:
                return False
            slots.add(slot)
            return True

    def release(self, user_id: int, slot: str) -> None:
        with self._lock:
            slots = self._users.get(user_id)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._users[user_id]

    def renew(self, held: list[tuple[int, str]], ttl: float) -> None:
        pass


_TAKE = """
local now = tonumber(ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6])  -- the process taking a slot is alive
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  -- At the limit: drop the slots of server processes that stopped beating (killed), so
  -- their users can reconnect elsewhere now rather than when the slots lapse.
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local process = string.match(member, '^(.*)/[^/]*$')
    if process then
      local until_ = redis.call('ZSCORE', KEYS[2], process)
      if not until_ or tonumber(until_) < now then redis.call('ZREM', KEYS[1], member) end
    end
  end
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class _RedisSlots:
    """A sorted set per user: member = ``process/connection``, score = when it lapses.
    The process part ties a slot to its server process's liveness (project.liveness)."""

    def __init__(self, url: str) -> None:
        self._redis = redisconn.client(url, socket_timeout=2, socket_connect_timeout=2)
        self._take = self._redis.register_script(_TAKE)
        # The server's loop takes and gives back the slots of its streams through an
        # async client, a burst of them in one pipeline (project.batch): no thread hop.
        self._url = url
        self._aredis: Any = None
        self._atake: Any = None

    def _async(self) -> Any:
        if self._aredis is None:
            self._aredis = redisconn.async_client(self._url, socket_timeout=2, socket_connect_timeout=2)
            self._atake = self._aredis.register_script(_TAKE)
        return self._aredis

    async def take_many(self, items: list[tuple[int, str]], limit: int, ttl: float) -> list[bool | BaseException]:
        pipe = self._async().pipeline(transaction=False)
        now = time.time()
        for user_id, slot in items:
            await self._atake(
                keys=[self._key(user_id), liveness.key("servers")],
                args=[now, now + ttl, limit, self._member(slot), math.ceil(ttl),
                      liveness.PROCESS_ID, now + liveness.ttl()],
                client=pipe,
            )
        results = await pipe.execute(raise_on_error=False)
        return [r if isinstance(r, BaseException) else bool(r) for r in results]

    async def release_many(self, items: list[tuple[int, str]]) -> list[None]:
        pipe = self._async().pipeline(transaction=False)
        for user_id, slot in items:
            pipe.zrem(self._key(user_id), self._member(slot))
        await pipe.execute(raise_on_error=False)
        return [None] * len(items)

    @staticmethod
    def _key(user_id: int) -> str:
        return f"{_prefix()}:streams:{user_id}"

    @staticmethod
    def _member(slot: str) -> str:
        return f"{liveness.PROCESS_ID}/{slot}"

    def take(self, user_id: int, slot: str, limit: int, ttl: float) -> bool:
        now = time.time()
        # One script: pruning, counting and adding cannot interleave with another process.
        return bool(self._take(
            keys=[self._key(user_id), liveness.key("servers")],
            args=[now, now + ttl, limit, self._member(slot), math.ceil(ttl),
                  liveness.PROCESS_ID, now + liveness.ttl()],
        ))

    def release(self, user_id: int, slot: str) -> None:
        self._redis.zrem(self._key(user_id), self._member(slot))

    def renew(self, held: list[tuple[int, str]], ttl: float) -> None:
        if not held:
            return
        expires = time.time() + ttl
        pipe = self._redis.pipeline(transaction=False)
        for user_id, slot in held:
            pipe.zadd(self._key(user_id), {self._member(slot): expires}, xx=True)
            pipe.expire(self._key(user_id), math.ceil(ttl))
        pipe.execute()


class _State:
    """A runtime's limits: where hits and slots are counted (Redis, or here), and the
    slots of the streams open here."""

    def __init__(self, rt: runtime.Runtime) -> None:
        url = settings.REDIS_URL
        self.counter = _RedisCounter(url) if url else _LocalCounter()
        self.slots = _RedisSlots(url) if url else _LocalSlots()
        self.held: dict[str, int] = {}  # slot -> user id
        self.takes: Batcher[tuple[int, str], bool] | None = None
        self.releases: Batcher[tuple[int, str], None] | None = None
        if isinstance(self.slots, _RedisSlots):
            slots = self.slots
            self.takes = Batcher(
                "slot-take", lambda items: slots.take_many(items, settings.TANDEM_MAX_CONNECTIONS_PER_USER, slot_ttl())
            )
            self.releases = Batcher("slot-release", slots.release_many)


STATE = runtime.Component("limits", _State)


# Seconds a client is told to wait before reopening a stream refused while Redis is down.
STREAM_RETRY_AFTER = 5


def slot_ttl() -> float:
    return float(settings.TANDEM_PRESENCE_TTL_SECONDS)


def take_stream_slot(user_id: int, slot: str) -> None:
    """Count a new stream of ``user_id``; TooManyConnections past the limit."""
    limit = settings.TANDEM_MAX_CONNECTIONS_PER_USER
    state = STATE.get()
    try:
        taken = state.slots.take(user_id, slot, limit, slot_ttl())
    except Exception:
        # Redis is down or hung, and a stream's live events come through it: refuse
        # before the stream starts rather than answer 200 and fall silent.
        raise streams_unavailable() from None
    if not taken:
        raise _too_many(limit)
    state.held[slot] = user_id


def _too_many(limit: int) -> TooManyConnections:
    return TooManyConnections(
        f"At most {limit} open streams per user; close one first.", headers={"Retry-After": "5"}
    )


def streams_unavailable() -> Unavailable:
    """Why a stream is refused while Redis, which carries live events, is unreachable
    (503, WebSocket close 4503)."""
    return Unavailable(
        "Live events are unavailable for a moment; reconnect shortly.",
        headers={"Retry-After": str(STREAM_RETRY_AFTER)},
    )


async def atake_stream_slot(user_id: int, slot: str) -> None:
    """``take_stream_slot`` from the runtime's loop: with Redis, the slots a burst of
    opens takes go in one pipeline, without a thread hop."""
    state = STATE.get()
    if state.takes is None:
        take_stream_slot(user_id, slot)  # in this process: no I/O
        return
    limit = settings.TANDEM_MAX_CONNECTIONS_PER_USER
    try:
        taken = await state.takes.submit((user_id, slot))
    except Exception:
        raise streams_unavailable() from None
    if not taken:
        raise _too_many(limit)
    state.held[slot] = user_id


async def arelease_stream_slot(slot: str) -> None:
    """``release_stream_slot`` from the runtime's loop, batched like the takes."""
    state = STATE.get()
    if state.releases is None:
        release_stream_slot(slot)
        return
    user_id = state.held.pop(slot, None)
    if user_id is None:
        return
    try:
        await state.releases.submit((user_id, slot))
    except Exception:  # it lapses by itself
        pass


def release_stream_slot(slot: str) -> None:
    state = STATE.get()
    user_id = state.held.pop(slot, None)
    if user_id is None:
        return
    try:
        state.slots.release(user_id, slot)
    except Exception:  # it lapses by itself
        pass


def renew_stream_slots() -> None:
    state = STATE.get()
    state.slots.renew([(user_id, slot) for slot, user_id in list(state.held.items())], slot_ttl())
