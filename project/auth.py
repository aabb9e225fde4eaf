"""Credentials: strict Bearer JWTs (or API keys) for REST, stream tickets, and the one
function that authenticates a stream (SSE or WebSocket) from its ASGI scope."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.models import User
from django.core import signing
from django.http.request import split_domain_port, validate_host
from django.utils.crypto import constant_time_compare
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer, TokenRefreshSerializer
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from project import sql
from project.errors import ApiError, AuthenticationFailed, NotAuthenticated

_TICKET_SALT = "tandem.stream-ticket"

# API keys (``sessions_app.models.ApiKey``) start with this; a JWT never does.
API_KEY_PREFIX = "tdm_"
# Set by the sessions app when it is ready (this layer does not import the models): the
# active user an API key names, or None.
_key_owner: Callable[[str], User | None] | None = None


def key_digest(raw: str) -> str:
    """What is stored of an API key, and what names it elsewhere (a stream remembers the
    digest of the key that opened it, to end when that key is revoked): its SHA-256. A key
    that random needs no slow hash: it cannot be guessed, only stolen."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyAuth:
    """``request.auth`` of a request authenticated by an API key: the key's digest (never
    the key), so what the request hands on (a stream ticket) stays tied to that key."""

    digest: str

    def __repr__(self) -> str:
        return "<API key>"


def by_api_key(request: Request) -> bool:
    return isinstance(request.auth, KeyAuth)


def key_of(request: Request) -> str | None:
    """The digest of the API key that authenticated ``request``, if one did."""
    return request.auth.digest if isinstance(request.auth, KeyAuth) else None


def register_key_reader(read: Callable[[str], User | None]) -> None:
    global _key_owner
    _key_owner = read


def user_for_key(raw: str) -> User:
    """The active user of an API key, or AuthenticationFailed (unknown, revoked, or its
    user disabled or deleted). Runs a query: from a request thread or through off_loop."""
    found = _key_owner(raw) if _key_owner is not None else None
    if found is None:
        raise AuthenticationFailed("The API key is not valid or has been revoked.")
    return found


def caller(request: Request) -> User:
    """The signed-in user of a request that its view's permission classes already
    required to be authenticated: typed as the user model, not "user or anonymous"."""
    user = request.user
    if not isinstance(user, User):
        raise NotAuthenticated()
    return user


class StrictJWTAuthentication(JWTAuthentication):
    """Any Authorization header that is not ``Bearer <jwt>`` is a bad credential (401),
    not an anonymous request that silently falls through to other schemes."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if header is None:
            return None
        parts = header.split()
        if len(parts) != 2 or parts[0] != "Bearer":
            raise AuthenticationFailed("Use 'Authorization: Bearer <access token>'.")
        if parts[1].startswith(API_KEY_PREFIX):
            return user_for_key(parts[1]), KeyAuth(key_digest(parts[1]))
        try:
            return super().authenticate(request)
        except Exception as exc:  # simplejwt raises its own InvalidToken/AuthenticationFailed
            raise AuthenticationFailed() from exc

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'

    def get_user(self, validated_token: Any) -> User:  # type: ignore[override]
        """simplejwt's checks (the user exists and is active; with CHECK_REVOKE_TOKEN, the
        password is the one the token was issued for) on a user read by one plain
        statement: every REST request pays for this lookup, and the ORM's building of
        the query was most of its cost."""
        try:
            user_id = int(validated_token[jwt_settings.USER_ID_CLAIM])
        except (KeyError, TypeError, ValueError):
            raise AuthenticationFailed() from None
        user = sql.get(User, user_id)
        if user is None or (jwt_settings.CHECK_USER_IS_ACTIVE and not user.is_active):
            raise AuthenticationFailed()
        if jwt_settings.CHECK_REVOKE_TOKEN and validated_token.get(
            jwt_settings.REVOKE_TOKEN_CLAIM
        ) != get_md5_hash_password(user.password):
            raise AuthenticationFailed("The user's password has been changed.")
        return user


def issue_ticket(user_id: int, key: str | None = None) -> str:
    """A stream ticket for ``user_id``. Asked for with an API key, it names that key's
    digest (``key``): the streams it opens end when the key is revoked, and once the key
    is revoked it opens none."""
    value = str(user_id) if key is None else f"{user_id}:{key}"
    return signing.TimestampSigner(salt=_TICKET_SALT).sign(value)


def read_ticket(ticket: str) -> tuple[int, str | None]:
    """(user id, the digest of the API key it was asked for with, if one was)."""
    try:
        raw = signing.TimestampSigner(salt=_TICKET_SALT).unsign(
            ticket, max_age=settings.TANDEM_TICKET_SECONDS
        )
        user_id, _, key = raw.partition(":")
        return int(user_id), key or None
    except (signing.BadSignature, ValueError):
        raise AuthenticationFailed("The stream ticket is not valid or has expired.") from None


def read_access_token(raw: str) -> tuple[int, float]:
    """(user id, expiry as a UNIX time) of an access JWT, or AuthenticationFailed."""
    try:
        token = AccessToken(raw)  # type: ignore[arg-type]
        return int(token["user_id"]), float(token["exp"])
    except (TokenError, KeyError, ValueError, TypeError):
        raise AuthenticationFailed() from None


def read_any_token(raw: str) -> int:
    """The user id of an access or a refresh JWT (signature and expiry checked), or
    AuthenticationFailed. For ``manage.py mcp_server``, which a user starts once and
    keeps: a refresh token lasts as long as a sign-in does."""
    try:
        return read_access_token(raw)[0]
    except AuthenticationFailed:
        pass
    try:
        return int(RefreshToken(raw)["user_id"])  # type: ignore[arg-type]
    except (TokenError, KeyError, ValueError, TypeError):
        raise AuthenticationFailed("The token is not a valid access or refresh token, or it has expired.") from None


@dataclass(frozen=True)
class StreamCredentials:
    user: User
    expires_at: float | None  # set when the stream must end with auth.expired


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def query_params(scope: dict[str, Any]) -> dict[str, str]:
    """Last value wins, like Django's QueryDict.__getitem__."""
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}


def _user_from_cookie(scope: dict[str, Any]) -> User | None:
    cookie_header = _header(scope, b"cookie")
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:
        return None
    morsel = jar.get(settings.SESSION_COOKIE_NAME)
    if morsel is None:
        return None
    engine = import_module(settings.SESSION_ENGINE)
    session = engine.SessionStore(morsel.value)
    user_id = session.get(SESSION_KEY)
    if user_id is None or session.get(BACKEND_SESSION_KEY) is None:
        return None
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return None
    # A password change invalidates old sessions, as it does for Django's own views.
    if not constant_time_compare(session.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()):
        return None
    return user


def _same_origin(scope: dict[str, Any]) -> str | None:
    """The handshake's own origin, ``scheme://host[:port]``, as Django's CSRF check
    computes it for a request (``is_secure()`` and ``get_host()``); None when the Host
    is not one of ALLOWED_HOSTS."""
    host = _header(scope, b"host")
    if not host:
        return None
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, allowed):
        return None
    secure = scope.get("scheme") in ("https", "wss")
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:  # behind a TLS-terminating proxy, as Django's request.is_secure() reads it
        name, value = proxy
        forwarded = _header(scope, name.removeprefix("HTTP_").replace("_", "-").lower().encode())
        if forwarded is not None:
            secure = forwarded.split(",", 1)[0].strip() == value
    return f"{'https' if secure else 'http'}://{host.lower()}"


def origin_allowed(scope: dict[str, Any]) -> bool:
    """A request without ``Origin`` is not a browser's cross-origin request (browsers send
    it on every WebSocket handshake and cross-origin request). One with an ``Origin`` must match,
    scheme, host and port exactly, the handshake's own origin or one of
    TANDEM_ALLOWED_ORIGINS, whatever credential it carries: the rule of Django's CSRF
    check, so a page on another port or scheme can neither ride the user's cookie nor
    use the API at all unless the operator allows its origin."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    origin = origin.strip().lower()
    return origin in settings.CSRF_TRUSTED_ORIGINS or origin == _same_origin(scope)


@dataclass(frozen=True)
class StreamClaim:
    """Who a stream's credentials say opens it, read without the database: the signature
    and expiry of a token or ticket are checked here; whether that user still exists and
    is active is the database's to say (``resolve_claims``). A cookie names a Django
    session, which only the session store can read: ``cookie`` is then True and
    ``user_id`` None."""

    user_id: int | None
    expires_at: float | None  # set when the stream must end with auth.expired
    cookie: bool = False
    api_key: str | None = None  # an API key, in the Authorization header only
    ticket_key: str | None = None  # the digest of the API key a ticket was asked for with

    @property
    def key(self) -> str | None:
        """The digest of the API key behind this credential, if one is: the stream ends
        when that key is revoked."""
        return key_digest(self.api_key) if self.api_key is not None else self.ticket_key


def read_stream_claim(scope: dict[str, Any], *, allow_cookie: bool = True) -> StreamClaim:
    """Bearer header, ``?token=``, ``?ticket=`` or the session cookie, in that order. No
    database: AuthenticationFailed for a bad or expired token or ticket, NotAuthenticated
    for no credential at all."""
    params = query_params(scope)
    header = _header(scope, b"authorization")
    user_id: int | None = None
    expires_at: float | None = None
    ticket_key: str | None = None
    if header is not None:
        parts = header.split()
        if len(parts) != 2 or parts[0] != "Bearer":
            raise AuthenticationFailed("Use 'Authorization: Bearer <access token>'.")
        if parts[1].startswith(API_KEY_PREFIX):
            return StreamClaim(None, None, api_key=parts[1])  # whose it is: the database's to say
        user_id, expires_at = read_access_token(parts[1])
    elif "token" in params:  # never an API key: a long-lived secret stays out of URLs
        user_id, expires_at = read_access_token(params["token"])
    elif "ticket" in params:
        user_id, ticket_key = read_ticket(params["ticket"])
    elif allow_cookie and origin_allowed(scope) and _header(scope, b"cookie"):
        # A page of a disallowed origin may make the browser send the cookie (an
        # EventSource with credentials, same site): it must not open the user's streams,
        # not even unreadable ones that take their connection slots.
        return StreamClaim(None, None, cookie=True)
    if user_id is None:
        raise NotAuthenticated()
    if expires_at is not None and expires_at <= time.time():
        raise AuthenticationFailed()
    return StreamClaim(user_id, expires_at, ticket_key=ticket_key)


def resolve_claims(claims: list[tuple[StreamClaim, dict[str, Any]]]) -> list[User | ApiError]:
    """The active user each (claim, scope) names, or the error to answer with: one query
    for every token and ticket of the batch, one session-store read per cookie.
    Synchronous: call through project.db.off_loop."""
    ids = {claim.user_id for claim, _ in claims if claim.user_id is not None}
    users: dict[int, User] = {}
    if ids:
        users = {u.pk: u for u in get_user_model().objects.filter(pk__in=ids, is_active=True)}
    out: list[User | ApiError] = []
    for claim, scope in claims:
        if claim.cookie:
            user = _user_from_cookie(scope)
            out.append(user if user is not None else NotAuthenticated())
            continue
        if claim.api_key is not None:
            try:
                out.append(user_for_key(claim.api_key))
            except AuthenticationFailed as exc:
                out.append(exc)
            continue
        assert claim.user_id is not None
        found = users.get(claim.user_id)
        # Checked again: a token may expire while it waits for the batch.
        if found is None or (claim.expires_at is not None and claim.expires_at <= time.time()):
            out.append(AuthenticationFailed())
        else:
            out.append(found)
    return out


def authenticate_stream(scope: dict[str, Any], *, allow_cookie: bool = True) -> StreamCredentials:
    """``read_stream_claim`` and ``resolve_claims`` for one stream. Runs database
    queries: call it through project.db.off_loop."""
    claim = read_stream_claim(scope, allow_cookie=allow_cookie)
    found = resolve_claims([(claim, scope)])[0]
    if isinstance(found, ApiError):
        raise found
    return StreamCredentials(found, claim.expires_at)


def _refuse_unknown(serializer: Any, data: Any) -> None:
    from rest_framework import serializers

    if isinstance(data, dict):
        unknown = sorted(set(data) - set(serializer.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})


class StrictTokenObtainPairSerializer(TokenObtainPairSerializer):
    def to_internal_value(self, data: Any) -> Any:
        _refuse_unknown(self, data)
        return super().to_internal_value(data)


class StrictTokenRefreshSerializer(TokenRefreshSerializer):
    def to_internal_value(self, data: Any) -> Any:
        _refuse_unknown(self, data)
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        # simplejwt looks the token's user up with .get(): a deleted user raised
        # DoesNotExist (a 500). Deleted and deactivated users alike get 401.
        try:
            return super().validate(attrs)
        except get_user_model().DoesNotExist:
            raise AuthenticationFailed("No active account found for the given token.") from None
