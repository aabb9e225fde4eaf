"""The one settings module. Every value comes from the environment through the small
helpers below, which raise ImproperlyConfigured on a value they cannot read instead of
guessing: a typo in production must stop the process, not change its behaviour."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from datetime import timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from project.rates import parse_rate

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum of {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum of {minimum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_secret(name: str) -> str:
    """``NAME``, or the contents of the file named by ``NAME_FILE`` (systemd credentials,
    Docker secrets); "" when neither is set."""
    value = os.environ.get(name, "").strip()
    path = os.environ.get(f"{name}_FILE", "").strip()
    if value and path:
        raise ImproperlyConfigured(f"Set {name} or {name}_FILE, not both")
    if not path:
        return value
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
    if not value:
        raise ImproperlyConfigured(f"{name}_FILE={path!r} is empty")
    return value


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def env_origins(name: str) -> list[str]:
    """A comma-separated list of bare origins, ``scheme://host[:port]``, as browsers send
    them in ``Origin``: anything else (a path, a space, a comment) could never match and
    is refused rather than silently ignored."""
    origins = []
    for item in env_list(name, []):
        origin = item.lower()
        if not _ORIGIN.fullmatch(origin):
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not an origin; write scheme://host[:port] "
                "(http or https, no path, no trailing slash), comma-separated"
            )
        origins.append(origin)
    return origins


_MCP_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MCP_KEYS = {
    "stdio": {"command", "args", "env", "cwd", "needs_permission", "timeout", "tools"},
    "http": {"url", "headers", "needs_permission", "timeout", "tools"},
}


def _mcp_strings(name: str, where: str, value: Any, kind: type) -> Any:
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ImproperlyConfigured(f"{name}: {where} must be a list of strings")
    if kind is dict and not (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    ):
        raise ImproperlyConfigured(f"{name}: {where} must be an object of strings")
    return value


def env_mcp_servers(name: str) -> dict[str, dict[str, Any]]:
    """The MCP servers whose tools Tandem's agents may use: a JSON object, server name to
    either ``{"command", "args"?, "env"?, "cwd"?}`` (stdio) or ``{"url", "headers"?}``
    (streamable HTTP), each with ``needs_permission`` (default true), ``timeout`` (seconds,
    default ``TANDEM_TOOL_TIMEOUT``) and ``tools`` (per-tool ``{"needs_permission": bool}``).
    Read like a secret (``NAME`` or ``NAME_FILE``), since headers and env carry keys. Every
    key is checked: a misspelt one would otherwise quietly run a tool without asking."""
    raw = env_secret(name)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object of server name to server")
    servers: dict[str, dict[str, Any]] = {}
    for server, conf in parsed.items():
        if not _MCP_NAME.fullmatch(server):
            raise ImproperlyConfigured(
                f"{name}: server name {server!r} must be 1-32 letters, digits, '_' or '-'"
            )
        if not isinstance(conf, dict) or ("command" in conf) == ("url" in conf):
            raise ImproperlyConfigured(f"{name}: server {server!r} needs exactly one of command or url")
        transport = "stdio" if "command" in conf else "http"
        unknown = sorted(set(conf) - _MCP_KEYS[transport])
        if unknown:
            raise ImproperlyConfigured(
                f"{name}: server {server!r} has unknown key(s) {', '.join(unknown)}"
            )
        entry: dict[str, Any] = {"transport": transport}
        if transport == "stdio":
            if not isinstance(conf["command"], str) or not conf["command"]:
                raise ImproperlyConfigured(f"{name}: server {server!r}: command must be a non-empty string")
            entry["command"] = conf["command"]
            entry["args"] = _mcp_strings(name, f"{server}.args", conf.get("args", []), list)
            entry["env"] = _mcp_strings(name, f"{server}.env", conf.get("env", {}), dict)
            cwd = conf.get("cwd")
            if cwd is not None and not isinstance(cwd, str):
                raise ImproperlyConfigured(f"{name}: server {server!r}: cwd must be a string")
            entry["cwd"] = cwd
        else:
            url = conf["url"]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ImproperlyConfigured(f"{name}: server {server!r}: url must be an http(s) URL")
            entry["url"] = url
            entry["headers"] = _mcp_strings(name, f"{server}.headers", conf.get("headers", {}), dict)
        needs = conf.get("needs_permission", True)
        if not isinstance(needs, bool):
            raise ImproperlyConfigured(f"{name}: server {server!r}: needs_permission must be true or false")
        entry["needs_permission"] = needs
        timeout = conf.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600
        ):
            raise ImproperlyConfigured(
                f"{name}: server {server!r}: timeout must be a number of seconds in (0, 3600]"
            )
        entry["timeout"] = None if timeout is None else float(timeout)
        per_tool = conf.get("tools", {})
        if not isinstance(per_tool, dict):
            raise ImproperlyConfigured(f"{name}: server {server!r}: tools must be an object")
        entry["tools"] = {}
        for tool, tool_conf in per_tool.items():
            if (
                not isinstance(tool_conf, dict)
                or set(tool_conf) != {"needs_permission"}
                or not isinstance(tool_conf["needs_permission"], bool)
            ):
                raise ImproperlyConfigured(
                    f"{name}: server {server!r}: tools.{tool} must be {{\"needs_permission\": true|false}}"
                )
            entry["tools"][tool] = {"needs_permission": tool_conf["needs_permission"]}
        servers[server] = entry
    return servers


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_secret("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off. Generate one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    # The quick start: a random key per installation, kept outside the checkout and
    # created on first run. Never reached with DEBUG off, so production never writes here.
    from project.secretkey import quickstart_key

    SECRET_KEY = quickstart_key()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "corsheaders",
    "channels",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "sessions_app",
    "events_app",
]

MIDDLEWARE = [
    "events_app.metrics.RequestTimingMiddleware",
    # Probes for any Host; every other request's Host checked once (project/probes.py).
    "project.probes.ProbesAndHostCheck",
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    # Serves static/ from any server (daphne, uvicorn) with no collectstatic step.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "project.errors.ApiErrorMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Page 404s are the Tandem page even with DEBUG on (no URL patterns shown).
    "project.middleware.NotFoundPage",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: every middleware above runs synchronously in the request's thread instead of
    # hopping to it and back for each of its calls (project/middleware.py).
    "project.middleware.SyncBoundary",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
try:
    # No persistent connections by default: under ASGI every request runs in a thread of
    # its own, and a connection kept by a finished thread is never closed (Django's docs
    # say as much). PostgreSQL gets a connection pool instead, below.
    _conn_max_age = env_int("TANDEM_DB_CONN_MAX_AGE", 0, minimum=0)
    _pool_size = env_int("TANDEM_DB_POOL_SIZE", 16, minimum=0)
    _db: dict[str, Any] = dict(dj_database_url.parse(
        DATABASE_URL, conn_max_age=_conn_max_age, conn_health_checks=_conn_max_age > 0
    ))
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so concurrent publishers queue up on the
    # busy timeout instead of failing with "database is locked" on lock upgrade.
    _db.setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file, not :memory:, so real server processes started by tests share it. The
    # directory is made by the test run (tests/conftest.py): nothing is written at import.
    _db["TEST"] = {
        "NAME": str(BASE_DIR / "var" / f"{env_str('TANDEM_TEST_DB_NAME', 'test-db')}.sqlite3")
    }
elif _db["ENGINE"] == "django.db.backends.postgresql" and not _conn_max_age and _pool_size:
    # A pool per process (psycopg_pool): a stream's or a request's queries borrow a
    # connection for the moment they run, with no handshake, and no open stream holds one.
    _db.setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": _pool_size, "timeout": 10}
if _db["ENGINE"] != "django.db.backends.sqlite3" and os.environ.get("TANDEM_TEST_DB_NAME"):
    # Lets several test runs share one PostgreSQL server without clobbering each other.
    _db["TEST"] = {"NAME": env_str("TANDEM_TEST_DB_NAME", "")}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
# Also keeps the limits' Redis keys apart between deployments sharing one Redis.
TANDEM_CHANNEL_PREFIX = env_str("TANDEM_CHANNEL_PREFIX", "tandem")
if REDIS_URL:
    from project.redisconn import channel_layer_host

    try:
        _redis_host = channel_layer_host(REDIS_URL)
    except ValueError as exc:
        raise ImproperlyConfigured(f"REDIS_URL: {exc}") from None
    # The pub/sub layer: one Redis subscription per group per process and no silent
    # capacity drops (see STACK-NOTES: the core layer loses events under fan-out).
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [_redis_host], "prefix": TANDEM_CHANNEL_PREFIX},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # One hub channel per process carries every event; the defaults (100
            # messages, groups expiring after a day) would drop bursts and silence idle
            # sessions.
            "CONFIG": {"capacity": 100_000, "group_expiry": 10 * 365 * 86400, "expiry": 3600},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if env_bool("TANDEM_FAST_PASSWORD_HASHER", False):
    # For test runs only: hashing is the slowest thing a test does.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# Production hardening, on whenever DEBUG is off. Behind a TLS-terminating proxy that
# sets X-Forwarded-Proto. TANDEM_HTTPS=false serves plain HTTP (a loopback benchmark).
TANDEM_HTTPS = env_bool("TANDEM_HTTPS", not DEBUG)
if TANDEM_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # Health checks and scrapes come over plain HTTP from inside the network.
    SECURE_REDIRECT_EXEMPT = [r"^healthz\Z", r"^readyz\Z", r"^metrics\Z"]  # \Z: "$" allows a final "\n"
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("TANDEM_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("TANDEM_HSTS_INCLUDE_SUBDOMAINS", True)
    # Joining the browsers' preload list is hard to undo: an explicit opt-in.
    SECURE_HSTS_PRELOAD = env_bool("TANDEM_HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = ["security.W021"]  # "preload is off": deliberately so
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Where `manage.py collectstatic` puts the files WhiteNoise serves: a directory of the
# installation (docs/DEPLOY.md), never the checkout, which may be read-only to the user the
# processes run as. Unset (the quick start), WhiteNoise serves the app directories directly.
STATIC_ROOT = env_str("TANDEM_STATIC_ROOT", "") or None
WHITENOISE_USE_FINDERS = STATIC_ROOT is None
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "project.auth.StrictJWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["project.errors.StrictJSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["project.limits.WriteThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "project.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

# The OpenAPI description (project/openapi.py): /api/schema/ and its Swagger UI, /api/docs/.
SPECTACULAR_SETTINGS = {
    "TITLE": "Tandem API",
    "VERSION": "1",
    "OAS_VERSION": "3.0.3",
    "SCHEMA_PATH_PREFIX": r"/api/",
    "COMPONENT_SPLIT_REQUEST": True,
    "COMPONENT_SPLIT_PATCH": False,  # PATCH bodies are validated whole (title is required)
    "ENUM_NAME_OVERRIDES": {"PartTypeEnum": ["text"]},
    "DEFAULT_GENERATOR_CLASS": "project.openapi.TandemSchemaGenerator",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "project.openapi.postprocess",
    ],
    # Public: the schema describes the API, not anyone's data.
    "SERVE_PUBLIC": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Swagger UI from drf-spectacular-sidecar's static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

TANDEM_ACCESS_TOKEN_SECONDS = env_int("TANDEM_ACCESS_TOKEN_SECONDS", 900, minimum=1)
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=TANDEM_ACCESS_TOKEN_SECONDS),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=7),
    "SIGNING_KEY": SECRET_KEY,
    "UPDATE_LAST_LOGIN": False,
    "TOKEN_OBTAIN_SERIALIZER": "project.auth.StrictTokenObtainPairSerializer",
    "TOKEN_REFRESH_SERIALIZER": "project.auth.StrictTokenRefreshSerializer",
}

# Open on the laptop quick start, closed in production unless the operator opens it.
TANDEM_ALLOW_SIGNUP = env_bool("TANDEM_ALLOW_SIGNUP", DEBUG)
TANDEM_TICKET_SECONDS = env_int("TANDEM_TICKET_SECONDS", 60, minimum=1)
TANDEM_MAX_MESSAGE_CHARS = env_int("TANDEM_MAX_MESSAGE_CHARS", 32_000, minimum=1)
# Messages waiting for their turn in one session (0: every message posted while a reply
# runs is refused with queue_full).
TANDEM_MAX_QUEUED = env_int("TANDEM_MAX_QUEUED", 20, minimum=0)
TANDEM_MAX_EVENT_BYTES = env_int("TANDEM_MAX_EVENT_BYTES", 65_536, minimum=256)
TANDEM_MAX_BODY_BYTES = env_int("TANDEM_MAX_BODY_BYTES", 262_144, minimum=1024)
TANDEM_MAX_WS_FRAME = env_int("TANDEM_MAX_WS_FRAME", 524_288, minimum=1024)
TANDEM_MAX_PRESENCE_BYTES = 4096
# The shared document (PROTOCOL §10): its size in characters (Unicode code points), how
# often at most a session's log gets a doc.updated event, and how often each server
# process folds a document's stored updates into one (sessions_app/doc.py).
TANDEM_MAX_DOC_CHARS = env_int("TANDEM_MAX_DOC_CHARS", 200_000, minimum=1)
TANDEM_DOC_EVENT_SECONDS = env_float("TANDEM_DOC_EVENT_SECONDS", 2.0, minimum=0.0)
TANDEM_DOC_COMPACT_SECONDS = env_float("TANDEM_DOC_COMPACT_SECONDS", 10.0, minimum=0.1)
TANDEM_DOC_COMPACT_UPDATES = env_int("TANDEM_DOC_COMPACT_UPDATES", 100, minimum=1)
TANDEM_EVENT_RETENTION_SECONDS = env_int("TANDEM_EVENT_RETENTION_SECONDS", 86_400, minimum=1)
TANDEM_EVENT_RETENTION_COUNT = env_int("TANDEM_EVENT_RETENTION_COUNT", 10_000, minimum=1)
TANDEM_PRUNE_INTERVAL_SECONDS = env_float("TANDEM_PRUNE_INTERVAL_SECONDS", 5.0, minimum=0.1)
TANDEM_HEARTBEAT_SECONDS = env_float("TANDEM_HEARTBEAT_SECONDS", 15.0, minimum=0.05)
TANDEM_STREAM_QUEUE = env_int("TANDEM_STREAM_QUEUE", 1000, minimum=1)
TANDEM_ECHO_DELAY_MS = env_int("TANDEM_ECHO_DELAY_MS", 20, minimum=0)
# Allocations between young-generation collections in server processes (Python's default
# is 700). Higher trades memory held by cyclic garbage for fewer pauses; see
# project/asgi.py and docs/PERFORMANCE.md.
TANDEM_GC_THRESHOLD = env_int("TANDEM_GC_THRESHOLD", 5_000, minimum=100)
# Django requests (not streams) one server process runs at once; see project/asgi.py.
TANDEM_MAX_CONCURRENT_REQUESTS = env_int("TANDEM_MAX_CONCURRENT_REQUESTS", 8, minimum=1)
# Seconds a client has to send a whole request body (read before the request takes one of
# those places); past it, 408.
TANDEM_REQUEST_BODY_TIMEOUT = env_float("TANDEM_REQUEST_BODY_TIMEOUT", 30.0, minimum=0.1)
TANDEM_COALESCE_MS = env_int("TANDEM_COALESCE_MS", 40, minimum=0)
TANDEM_COALESCE_BYTES = env_int("TANDEM_COALESCE_BYTES", 1024, minimum=1)
TANDEM_PRESENCE_TTL_SECONDS = env_int("TANDEM_PRESENCE_TTL_SECONDS", 60, minimum=2)
# A server process or agents worker that has not beaten for this long counts as dead
# (project/liveness.py): its stream slots stop counting, and /readyz no longer counts it.
TANDEM_LIVENESS_SECONDS = env_float("TANDEM_LIVENESS_SECONDS", 5.0, minimum=1.0)
TANDEM_ALLOWED_ORIGINS = env_origins("TANDEM_ALLOWED_ORIGINS")
# PROTOCOL §8. The rates are checked here so a typo stops the process at start.
TANDEM_RATE_WRITE = env_str("TANDEM_RATE_WRITE", "120/min")
# The sign-in endpoints (token, refresh, register, ticket), per client address and per
# account (project/limits.py AuthThrottle): password guessing is slow from one address
# and slow against one account from many.
TANDEM_RATE_AUTH_IP = env_str("TANDEM_RATE_AUTH_IP", "60/min")
TANDEM_RATE_AUTH_USER = env_str("TANDEM_RATE_AUTH_USER", "10/min")
# Stream tickets, per address and per user: generous, since every stream a page opens or
# reopens takes one and the caller has already signed in.
TANDEM_RATE_TICKET = env_str("TANDEM_RATE_TICKET", "120/min")
for _name in ("TANDEM_RATE_WRITE", "TANDEM_RATE_AUTH_IP", "TANDEM_RATE_AUTH_USER", "TANDEM_RATE_TICKET"):
    try:
        parse_rate(globals()[_name])
    except ValueError as exc:
        raise ImproperlyConfigured(f"{_name}: {exc}") from None
# Proxies whose X-Forwarded-For names the client (addresses or networks): the nginx in
# front, on this machine by default.
TANDEM_TRUSTED_PROXIES = env_list("TANDEM_TRUSTED_PROXIES", ["127.0.0.1", "::1"])
for _proxy in TANDEM_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"TANDEM_TRUSTED_PROXIES: {_proxy!r} is not an IP address or network"
        ) from None
TANDEM_MAX_CONNECTIONS_PER_USER = env_int("TANDEM_MAX_CONNECTIONS_PER_USER", 20, minimum=1)

# Agents (PROTOCOL §7). Replies run in the server process ("inline") unless a Redis
# channel layer is configured, where ``manage.py run_agents`` workers take them.
TANDEM_AGENT_MODE = env_str("TANDEM_AGENT_MODE", "worker" if REDIS_URL else "inline")
if TANDEM_AGENT_MODE not in ("inline", "worker"):
    raise ImproperlyConfigured("TANDEM_AGENT_MODE must be 'inline' or 'worker'.")
TANDEM_AGENT_CONCURRENCY = env_int("TANDEM_AGENT_CONCURRENCY", 100, minimum=1)
TANDEM_RUN_LEASE_SECONDS = env_float("TANDEM_RUN_LEASE_SECONDS", 20.0, minimum=1.0)
TANDEM_PERMISSION_TIMEOUT = env_float("TANDEM_PERMISSION_TIMEOUT", 300.0, minimum=0.1)
TANDEM_TOOL_TIMEOUT = env_float("TANDEM_TOOL_TIMEOUT", 10.0, minimum=0.1)
# MCP servers whose tools the agents may use (sessions_app/agents/mcp_tools.py).
TANDEM_MCP_SERVERS = env_mcp_servers("TANDEM_MCP_SERVERS")
TANDEM_OPENAI_BASE_URL = env_str("TANDEM_OPENAI_BASE_URL", "https://api.openai.com/v1")
TANDEM_OPENAI_API_KEY = env_str("TANDEM_OPENAI_API_KEY", "")
TANDEM_OPENAI_MODEL = env_str("TANDEM_OPENAI_MODEL", "gpt-4o-mini")
TANDEM_OPENAI_TIMEOUT = env_float("TANDEM_OPENAI_TIMEOUT", 60.0, minimum=0.1)
TANDEM_OPENAI_MAX_RETRIES = env_int("TANDEM_OPENAI_MAX_RETRIES", 3, minimum=0)
TANDEM_OPENAI_RETRY_BASE_SECONDS = env_float("TANDEM_OPENAI_RETRY_BASE_SECONDS", 1.0, minimum=0.0)
# The Redis pub/sub bridge for external agent services (manage.py ingest_redis).
TANDEM_INGEST_PATTERN = env_str("TANDEM_INGEST_PATTERN", "tandem:ingest:*")
TANDEM_INGEST_USER = env_str("TANDEM_INGEST_USER", "")
# Keep the largest allowed body above the event limit so the event check, not Django's
# generic one, answers for oversized events.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(TANDEM_MAX_BODY_BYTES, TANDEM_MAX_EVENT_BYTES) + 1024

CSRF_TRUSTED_ORIGINS = [o for o in TANDEM_ALLOWED_ORIGINS if o.startswith(("http://", "https://"))]
# Cross-origin REST for those origins only; the SSE consumer applies the same list itself
# (it answers outside Django's middleware).
CORS_ALLOWED_ORIGINS = CSRF_TRUSTED_ORIGINS
CORS_URLS_REGEX = r"^/api/.*\Z"
CORS_ALLOW_HEADERS = ["authorization", "content-type", "last-event-id", "x-csrftoken"]
CORS_EXPOSE_HEADERS = ["retry-after"]
CORS_PREFLIGHT_MAX_AGE = 600

TANDEM_LOG_FORMAT = env_str("TANDEM_LOG_FORMAT", "plain")
if TANDEM_LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured("TANDEM_LOG_FORMAT must be 'plain' or 'json'.")

# Email: only the password reset page sends any (docs/DEPLOY.md "Email"). "console" prints
# each message, reset link included, to the server's standard output: what a laptop user
# needs, and so refused wherever output is production-style (DEBUG off or JSON logs), where
# the link would land in the journal. "none" (the default there) turns the reset page off.
TANDEM_EMAIL_BACKEND = env_str(
    "TANDEM_EMAIL_BACKEND", "console" if DEBUG and TANDEM_LOG_FORMAT == "plain" else "none"
)
if TANDEM_EMAIL_BACKEND not in ("console", "smtp", "none"):
    raise ImproperlyConfigured("TANDEM_EMAIL_BACKEND must be 'console', 'smtp' or 'none'.")
if TANDEM_EMAIL_BACKEND == "console" and not (DEBUG and TANDEM_LOG_FORMAT == "plain"):
    raise ImproperlyConfigured(
        "TANDEM_EMAIL_BACKEND=console writes password reset links to the logs; it is for the "
        "quick start only (DEBUG on, plain logs). Use 'smtp' or 'none'."
    )
EMAIL_BACKEND = {
    "console": "django.core.mail.backends.console.EmailBackend",
    "smtp": "django.core.mail.backends.smtp.EmailBackend",
    # Never called: the reset page says email is off instead of pretending to send.
    "none": "django.core.mail.backends.dummy.EmailBackend",
}[TANDEM_EMAIL_BACKEND]
EMAIL_HOST = env_str("TANDEM_EMAIL_HOST", "")
EMAIL_PORT = env_int("TANDEM_EMAIL_PORT", 587, minimum=1)
if EMAIL_PORT > 65535:
    raise ImproperlyConfigured(f"TANDEM_EMAIL_PORT={EMAIL_PORT} is not a port (1-65535)")
EMAIL_HOST_USER = env_str("TANDEM_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = env_secret("TANDEM_EMAIL_PASSWORD")
# "starttls" (port 587), "tls" (implicit TLS, port 465) or "none" (a relay on this machine).
TANDEM_EMAIL_SECURITY = env_str("TANDEM_EMAIL_SECURITY", "starttls")
if TANDEM_EMAIL_SECURITY not in ("starttls", "tls", "none"):
    raise ImproperlyConfigured("TANDEM_EMAIL_SECURITY must be 'starttls', 'tls' or 'none'.")
EMAIL_USE_TLS = TANDEM_EMAIL_SECURITY == "starttls"
EMAIL_USE_SSL = TANDEM_EMAIL_SECURITY == "tls"
# Django waits forever by default: a mail server that stops answering would hold the
# request, and one of the process's request places, for good.
EMAIL_TIMEOUT = env_float("TANDEM_EMAIL_TIMEOUT", 10.0, minimum=0.1)
DEFAULT_FROM_EMAIL = env_str("TANDEM_EMAIL_FROM", "")
if not DEFAULT_FROM_EMAIL and TANDEM_EMAIL_BACKEND != "smtp":
    DEFAULT_FROM_EMAIL = "tandem@localhost"  # printed, never sent
if DEFAULT_FROM_EMAIL and (
    "@" not in parseaddr(DEFAULT_FROM_EMAIL)[1] or any(c in DEFAULT_FROM_EMAIL for c in "\r\n")
):
    raise ImproperlyConfigured(
        f"TANDEM_EMAIL_FROM={DEFAULT_FROM_EMAIL!r} is not an address (tandem@example.org or "
        "Tandem <tandem@example.org>)"
    )
if TANDEM_EMAIL_BACKEND == "smtp":
    if not EMAIL_HOST:
        raise ImproperlyConfigured("TANDEM_EMAIL_BACKEND=smtp needs TANDEM_EMAIL_HOST.")
    if not DEFAULT_FROM_EMAIL:
        raise ImproperlyConfigured(
            "TANDEM_EMAIL_BACKEND=smtp needs TANDEM_EMAIL_FROM, an address the mail server "
            "accepts as sender."
        )
    if EMAIL_HOST_PASSWORD and not EMAIL_HOST_USER:
        raise ImproperlyConfigured("TANDEM_EMAIL_PASSWORD is set without TANDEM_EMAIL_USER.")

LOGGING_CONFIG = "project.logfilters.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact": {"()": "project.logfilters.RedactSecrets"},
        "quiet_readiness": {"()": "project.logfilters.QuietReadinessFailures"},
    },
    "formatters": {
        "plain": {
            "()": "project.logfilters.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "project.logfilters.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler", "filters": ["redact"],
            "formatter": "json" if TANDEM_LOG_FORMAT == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": env_str("TANDEM_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR", "filters": ["quiet_readiness"]},
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # One line per request and stream, query secrets redacted (project/asgi.py).
        "tandem.access": {"level": "INFO" if env_bool("TANDEM_ACCESS_LOG", True) else "WARNING"},
    },
}
