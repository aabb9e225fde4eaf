"""Personas and real components. alice owns, bob collaborates (editor), carol watches
(viewer), charlie is an outsider who must see nothing of alice's."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from channels.layers import channel_layers
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "correct-horse-battery-9"


pytest_plugins = ["tests.browser", "tests.envelopes"]


def pytest_configure(config: Any) -> None:
    from django.conf import settings

    (ROOT / "var").mkdir(exist_ok=True)  # SQLite test databases (project/settings.py)

    # The server processes the tests start use PostgreSQL's connection pool, as in
    # production. This process opens and closes its own: a pool would still hold
    # connections when the test database is dropped at the end.
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    settings.DATABASES["default"].get("OPTIONS", {}).pop("pool", None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    # Lets fixtures see whether the test failed (the browser fixture takes screenshots).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: Any, nextitem: Any) -> Iterator[None]:
    # Before any fixture is torn down (the database first of all): a reply a test
    # started must not go on writing into the next test.
    from tests.runtime_control import stop_replies

    stop_replies()
    yield


@pytest.fixture(autouse=True)
def _fast_settings(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.TANDEM_ECHO_DELAY_MS = 1
    # Tests publish in bursts; the limits have tests of their own that set them.
    settings.TANDEM_RATE_WRITE = "none"
    settings.TANDEM_RATE_AUTH_IP = settings.TANDEM_RATE_AUTH_USER = settings.TANDEM_RATE_TICKET = "none"
    from tests.runtime_control import fresh_runtimes

    fresh_runtimes()


def make_user(username: str) -> Any:
    return get_user_model().objects.create_user(username=username, password=PASSWORD)


@pytest.fixture
def alice(db: None) -> Any:
    return make_user("alice")


@pytest.fixture
def bob(db: None) -> Any:
    return make_user("bob")


@pytest.fixture
def carol(db: None) -> Any:
    return make_user("carol")


@pytest.fixture
def charlie(db: None) -> Any:
    return make_user("charlie")


def token_for(user: Any) -> str:
    return str(AccessToken.for_user(user))


def client_for(user: Any | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    return client


@pytest.fixture
def api() -> Any:
    return client_for


@pytest.fixture
def shared_session(alice: Any, bob: Any, carol: Any, charlie: Any) -> Any:
    """alice's session; bob is an editor, carol a viewer, charlie nothing."""
    from sessions_app import services

    session = services.create_session(alice, title="Fix the login bug", agent="echo")
    services.add_member(session, username="bob", role="editor")
    services.add_member(session, username="carol", role="viewer")
    session.refresh_from_db()
    return session


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# ---------------------------------------------------------------- Redis


def _require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # a test that needs Redis fails, it never skips
        pytest.fail(f"Redis is required at {REDIS_URL} and is not reachable: {exc}")


@pytest.fixture
def redis_layer(settings: Any) -> Iterator[str]:
    """Switch this process to the real Redis pub/sub channel layer (and Redis presence and
    limits): the runtimes made before the switch are discarded, and again after it."""
    from tests.runtime_control import fresh_runtimes

    _require_redis()
    prefix = f"tandemtest{os.getpid()}x{time.monotonic_ns()}"
    settings.REDIS_URL = REDIS_URL
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": prefix},
        }
    }
    channel_layers.backends.clear()
    fresh_runtimes()
    yield prefix
    channel_layers.backends.clear()
    fresh_runtimes()


class PrivateRedis:
    """A redis-server of this test's own on a free port, to stop, start, pause (SIGSTOP)
    and resume (SIGCONT) without touching the Redis other tests and processes share."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is required for tests that stop and pause Redis")
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


# ---------------------------------------------------------------- real server processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class ServerProcess:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Which ASGI server the real-process tests start: daphne, or uvicorn (TANDEM_TEST_ASGI_SERVER).
ASGI_SERVER = os.environ.get("TANDEM_TEST_ASGI_SERVER", "daphne")


def _server_command(server: str, port: int, log_args: str | None = None) -> list[str]:
    """``log_args`` (``ASGI_SERVER_ARGS`` in a test's env) replaces the server's logging
    flags, e.g. ``"--log-level debug"`` for uvicorn or ``"--verbosity 2"`` for daphne."""
    if server == "uvicorn":
        flags = shlex.split(log_args) if log_args is not None else ["--no-access-log", "--log-level", "warning"]
        return [
            sys.executable, "-m", "uvicorn", *flags,
            "--timeout-graceful-shutdown", "5", "--host", "127.0.0.1", "--port", str(port),
            "project.asgi:application",
        ]
    # --verbosity 0: quiet; daphne's own access log is routed into the `daphne.access`
    # logger (project/logfilters.py), off unless asked for.
    flags = shlex.split(log_args) if log_args is not None else ["--verbosity", "0"]
    return [sys.executable, "-m", "daphne", *flags, "-b", "127.0.0.1", "-p", str(port), "project.asgi:application"]


def start_server(
    env_extra: dict[str, str], tmp_path: Path, name: str = "server", port: int | None = None
) -> ServerProcess:
    """A server process; ``port`` restarts one where a stopped one listened."""
    port = port or free_port()
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "TANDEM_ECHO_DELAY_MS": "2",
        "TANDEM_FAST_PASSWORD_HASHER": "1",
        "TANDEM_RATE_WRITE": "none",
        "TANDEM_RATE_AUTH_IP": "none",
        "TANDEM_RATE_AUTH_USER": "none",
        "TANDEM_RATE_TICKET": "none",
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    log_path = tmp_path / f"{name}-{port}.log"
    proc = subprocess.Popen(
        _server_command(env_extra.get("ASGI_SERVER", ASGI_SERVER), port, env_extra.get("ASGI_SERVER_ARGS")),
        cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    server = ServerProcess(port, proc, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not start:\n{server.log()}")


def start_worker(
    env_extra: dict[str, str], tmp_path: Path, name: str = "worker", args: tuple[str, ...] = ()
) -> ServerProcess:
    """A ``manage.py run_agents`` process (with extra ``args``); ready once it prints ``ready``."""
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "TANDEM_ECHO_DELAY_MS": "2",
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_agents", "--drain-seconds", "2", *args],
        cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    worker = ServerProcess(0, proc, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{worker.log()}")
        if "ready" in worker.log():
            return worker
        time.sleep(0.05)
    worker.stop()
    raise AssertionError(f"worker did not start:\n{worker.log()}")


@pytest.fixture
def servers(transactional_db: None, tmp_path: Path) -> Iterator[Any]:
    """Start real daphne processes on the test database: ``servers(n, redis=True)``.
    Replies run inline in the servers unless ``workers`` asks for ``run_agents``
    processes (worker mode); those are in ``servers.workers``."""
    started: list[ServerProcess] = []
    prefix = f"tandemlive{os.getpid()}x{time.monotonic_ns()}"

    def start(n: int = 1, *, redis: bool = False, workers: int = 0, **env: str) -> list[ServerProcess]:
        extra = {"TANDEM_AGENT_MODE": "worker" if workers else "inline", **env}
        if redis:
            if "REDIS_URL" not in extra:  # a test's private Redis needs no check here
                _require_redis()
            extra.setdefault("REDIS_URL", REDIS_URL)
            extra["TANDEM_CHANNEL_PREFIX"] = prefix
        for i in range(workers):
            start.workers.append(start_worker(extra, tmp_path, name=f"worker{i}"))  # type: ignore[attr-defined]
        for i in range(n):
            started.append(start_server(extra, tmp_path, name=f"server{i}"))
        return started[-n:] if n else []

    start.workers = []  # type: ignore[attr-defined]
    start.env = lambda: {"REDIS_URL": REDIS_URL, "TANDEM_CHANNEL_PREFIX": prefix}  # type: ignore[attr-defined]
    yield start
    for server in [*started, *start.workers]:  # type: ignore[attr-defined]
        server.stop()


@pytest.fixture
def sse_streams() -> Iterator[Any]:
    """``sse_streams(base_url, path, token=…, headers=…)`` opens a raw-socket SSE client
    (tests/test_sse_real_socket.py) that is closed after the test."""
    from tests.test_sse_real_socket import SSEClient

    opened: list[SSEClient] = []

    def open_stream(*args: Any, **kwargs: Any) -> SSEClient:
        stream = SSEClient(*args, **kwargs)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()
