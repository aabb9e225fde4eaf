"""docs/DEPLOY.md, followed on this machine (the page says which steps, and which it
cannot run here). systemd is not running: the test runs what the unit files under deploy/
say, as the user they name, so the page, the units and the test cannot drift apart."""
from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import REDIS_URL, ROOT, _require_redis, free_port, token_for
from tests.test_sse_real_socket import SSEClient

pytestmark = [pytest.mark.slow, pytest.mark.redis]

DEPLOY = ROOT / "deploy"
SERVER_NAME = "tandem.test"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what a unit gets


# ------------------------------------------------------------------ what DEPLOY.md ships


def unit(name: str) -> dict[str, str]:
    """The [Service] settings of a unit file under deploy/."""
    settings: dict[str, str] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def env_file(text: str) -> dict[str, str]:
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def _block_after(markdown: str, marker: str) -> str:
    """The first fenced block after ``marker`` in a Markdown text."""
    rest = markdown[markdown.index(marker):]
    match = re.search(r"```[a-z]*\n(.*?)```", rest, re.S)
    assert match, f"no code block after {marker!r}"
    return match.group(1)


def doc_block(heading: str, index: int = 0) -> str:
    """The index-th ``sh`` block of DEPLOY.md's section ``heading``."""
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = doc[doc.index(heading):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[index]


def test_deploy_md_shows_the_shipped_files_verbatim() -> None:
    """DEPLOY.md includes the unit files and the environment file word for word, so what
    a reader copies is what the deployment test runs."""
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    for name in ("tandem.env.example", "tandem-web@.service", "tandem-agents.service"):
        assert _block_after(doc, f"<!-- deploy/{name} -->") == (DEPLOY / name).read_text(), name


# ------------------------------------------------------------------ the installation


def _run(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _psql(sql: str, db: str = "postgres") -> str:
    return _run("runuser", "-u", "postgres", "--", "psql", "-d", db, "-tAc", sql).stdout.strip()


@dataclass
class Process:
    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    offset: int = 0  # where this start's output begins in the log

    def start(self) -> None:
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # What systemd does with User=/Group=: the command itself runs as the user (setpriv
        # execs it, so signals reach the server process directly).
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=tandem", "--regid=tandem", "--init-groups", *self.argv],
            cwd=self.cwd, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:  # systemctl stop: KillSignal=SIGTERM, then the unit's TimeoutStopSec
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Installation:
    prefix: Path
    env: dict[str, str]
    app: Path
    db: str
    processes: list[Process] = field(default_factory=list)

    def path(self, text: str) -> str:
        """The documented absolute paths, moved under this test's prefix."""
        for documented in ("/opt/tandem", "/etc/tandem", "/var/lib/tandem"):
            text = text.replace(documented, str(self.prefix) + documented)
        return text

    def shell(self, script: str) -> subprocess.CompletedProcess[str]:
        """A block of DEPLOY.md, run by bash as root with its paths under the prefix."""
        return _run("bash", "-euc", self.path(script), env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"})

    def manage(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """A manage.py command through DEPLOY.md's ``tandem-manage`` shell function, taken
        from the page: as the tandem user, with the environment file."""
        doc = (ROOT / "docs" / "DEPLOY.md").read_text()
        function = next(line for line in doc.splitlines() if line.startswith("tandem-manage() {"))
        script = f'{self.path(function)}\ntandem-manage "$@"'
        return _run("bash", "-c", script, "tandem-manage", *args, env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **extra_env})

    def service(self, unit_name: str, instance: str = "") -> Process:
        settings = unit(unit_name)
        assert settings["User"] == "tandem" and settings["Group"] == "tandem"
        assert self.path(settings["EnvironmentFile"]) == str(self.prefix / "etc/tandem/tandem.env")
        argv = shlex.split(self.path(settings["ExecStart"].replace("%i", instance)))
        process = Process(
            f"{unit_name}{instance}", argv, self.path(settings["WorkingDirectory"]), self.env,
            self.prefix / f"{unit_name}{instance}.log",
        )
        self.processes.append(process)
        return process


def _wait_web(process: Process, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.proc is not None
        if process.proc.poll() is not None:
            raise AssertionError(f"{process.name} exited:\n{process.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Host": SERVER_NAME}, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{process.name} did not answer /healthz:\n{process.log()}")


def _wait_worker(process: Process) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.proc is not None
        if process.proc.poll() is not None:
            raise AssertionError(f"{process.name} exited:\n{process.log()}")
        if b"ready" in process.log_path.read_bytes()[process.offset:]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{process.name} did not start:\n{process.log()}")


@pytest.fixture
def installation() -> Iterator[Installation]:
    """DEPLOY.md's install steps, with /opt/tandem, /etc/tandem and /var/lib/tandem under
    a temporary prefix and the project's venv standing in for the one `pip install` makes."""
    if os.geteuid() != 0:
        pytest.fail("the deployment test creates a system user and runs as root (as in CI)")
    if not Path("/var/run/postgresql").is_dir():
        pytest.fail("the deployment test needs the local PostgreSQL's Unix socket (/var/run/postgresql)")
    _require_redis()
    prefix = Path(tempfile.mkdtemp(prefix="tandem-deploy-"))
    prefix.chmod(0o755)  # mkdtemp's 0700 would hide everything from the user
    db = f"{os.environ.get('TANDEM_TEST_DB_NAME', 'test')}_deploy".replace("-", "_")
    inst = Installation(prefix, {}, prefix / "opt/tandem/app", db)
    try:
        # "The user and the directories", as written (the user may exist from an earlier run).
        users = doc_block("## 2. The user")
        if _run("id", "tandem", check=False).returncode == 0:
            users = "\n".join(line for line in users.splitlines() if not line.startswith("useradd"))
        inst.shell(users)
        # The checkout, owned by root: read-only to the user.
        files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
        inst.app.mkdir(parents=True)
        for name in filter(None, files.split("\0")):
            if (ROOT / name).is_file():
                (inst.app / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, inst.app / name)
        # The virtualenv, from Debian's python3 as DEPLOY.md makes it. Instead of `pip install`
        # (which needs the network), it sees the project's installed dependencies.
        venv = prefix / "opt/tandem/venv"
        _run("python3", "-m", "venv", "--without-pip", str(venv), env={"PATH": SYSTEMD_PATH})
        site = next((venv / "lib").glob("python3*/site-packages"))
        deps = sysconfig.get_paths()["purelib"]
        if _run("runuser", "-u", "tandem", "--", "test", "-r", f"{deps}/django/__init__.py", check=False).returncode:
            pytest.fail(f"the project's virtualenv ({deps}) must be readable by the tandem user for this test")
        (site / "tandem-test-deps.pth").write_text(deps + "\n")
        _run("chmod", "-R", "u=rwX,go=rX", str(prefix / "opt/tandem"))

        # PostgreSQL: the tandem role and its database (the shared server is never stopped).
        if _psql("SELECT 1 FROM pg_roles WHERE rolname = 'tandem'") != "1":
            _run("runuser", "-u", "postgres", "--", "createuser", "tandem")
        _run("runuser", "-u", "postgres", "--", "dropdb", "--if-exists", db)
        _run("runuser", "-u", "postgres", "--", "createdb", "-O", "tandem", db)

        # "The environment file", as written, for this test's host name; then what differs
        # on a test machine (the database's name, Redis, a private channel prefix, the
        # static root under the prefix). Every key the test sets is one the example has.
        inst.shell(doc_block("## 5. The environment file").replace("HOST=tandem.example.com", f"HOST={SERVER_NAME}"))
        env_path = prefix / "etc/tandem/tandem.env"
        installed = env_file(env_path.read_text())
        example = env_file((DEPLOY / "tandem.env.example").read_text())
        assert installed["ALLOWED_HOSTS"] == SERVER_NAME
        assert installed["TANDEM_ALLOWED_ORIGINS"] == f"https://{SERVER_NAME}"
        assert len(installed["SECRET_KEY"]) >= 50 and installed["SECRET_KEY"] != example["SECRET_KEY"]
        env_stat = env_path.stat()
        assert (env_stat.st_uid, env_stat.st_gid, env_stat.st_mode & 0o777) == (0, pwd.getpwnam("tandem").pw_gid, 0o640)
        overrides = {
            "DATABASE_URL": example["DATABASE_URL"].rsplit("/", 1)[0] + f"/{db}",
            "REDIS_URL": REDIS_URL,
            "TANDEM_CHANNEL_PREFIX": f"deploytest{os.getpid()}x{time.monotonic_ns()}",
            "TANDEM_STATIC_ROOT": inst.path(example["TANDEM_STATIC_ROOT"]),
        }
        assert set(overrides) <= set(example), set(overrides) - set(example)
        with env_path.open("a") as out:
            out.write("".join(f"{k}={v}\n" for k, v in overrides.items()))
        # systemd gives a unit only its EnvironmentFile and a minimal environment.
        inst.env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                    **env_file(env_path.read_text())}
        yield inst
    finally:
        for process in inst.processes:
            process.stop()
        _run("runuser", "-u", "postgres", "--", "dropdb", "--if-exists", "--force", db, check=False)
        _run("runuser", "-u", "postgres", "--", "dropdb", "--if-exists", "--force", f"{db}_restored", check=False)
        shutil.rmtree(prefix, ignore_errors=True)


# ------------------------------------------------------------------ nginx


@dataclass
class Proxy:
    https_port: int
    http_port: int
    tls: ssl.SSLContext
    certificate: Path

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.https, verify=self.tls, headers={"Host": SERVER_NAME, **kw.pop("headers", {})}, timeout=10, **kw)


@pytest.fixture
def nginx() -> Iterator[Any]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():  # a deployment test never skips: it fails, saying why
        pytest.fail("nginx is required (apt-get install nginx)")
    started: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="tandem-nginx-"))

    def start(upstreams: list[str], **render: str) -> Proxy:
        (work / "temp").mkdir(exist_ok=True)
        cert, key = work / "tandem.crt", work / "tandem.key"
        if not cert.exists():  # DEPLOY.md's self-signed certificate, for tandem.test
            _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                 "-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert))
        https_port, http_port = free_port(), free_port()
        # The documented renderer, run with the system's python3 as DEPLOY.md does.
        conf = _run(
            "python3", str(DEPLOY / "render_nginx.py"), "--server-name", SERVER_NAME,
            *[arg for u in upstreams for arg in ("--upstream", u)],
            "--certificate", str(cert), "--certificate-key", str(key),
            "--http-listen", f"127.0.0.1:{http_port}", "--https-listen", f"127.0.0.1:{https_port}",
            *[arg for k, v in render.items() for arg in (f"--{k.replace('_', '-')}", v)],
        ).stdout
        (work / "tandem.conf").write_text(conf)
        # What Debian's /etc/nginx/nginx.conf provides around conf.d, with this test's paths.
        temp = work / "temp"
        main = (
            f"user root;\npid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n client_body_temp_path {temp}/body;\n proxy_temp_path {temp}/proxy;\n"
            f" fastcgi_temp_path {temp}/fastcgi;\n uwsgi_temp_path {temp}/uwsgi;\n scgi_temp_path {temp}/scgi;\n"
            f" include {work}/tandem.conf;\n}}\n"
        )
        (work / "nginx.conf").write_text(main)
        _run(binary, "-t", "-c", str(work / "nginx.conf"))
        proc = subprocess.Popen([binary, "-c", str(work / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE)
        started.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=0.2).close()
                return Proxy(https_port, http_port, ssl.create_default_context(cafile=str(cert)), cert)
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)
    shutil.rmtree(work, ignore_errors=True)


def _wss(proxy: Proxy, path: str) -> Any:
    """A WebSocket through nginx over TLS, addressed to the public host name."""
    sock = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)
    return ws_connect(f"wss://{SERVER_NAME}:{proxy.https_port}{path}", sock=sock, ssl=proxy.tls,
                      server_hostname=SERVER_NAME, open_timeout=5)


def _sse(proxy: Proxy, path: str, token: str, **headers: str) -> SSEClient:
    return SSEClient(proxy.https, path, token=token, tls=proxy.tls, headers={"Host": SERVER_NAME, **headers})


# ------------------------------------------------------------------ the walk


def test_deployment_from_the_docs(installation: Installation, nginx: Any) -> None:
    inst = installation
    app_uid = pwd.getpwnam("tandem").pw_uid

    # The code is read-only to the user the processes run as.
    assert _run("runuser", "-u", "tandem", "--", "test", "-w", str(inst.app), check=False).returncode != 0
    assert _run("runuser", "-u", "tandem", "--", "test", "-w", str(inst.app / "project"), check=False).returncode != 0

    # migrate, collectstatic and the first user, as the user (DEPLOY.md's tandem-manage).
    inst.manage("migrate", "--noinput")
    inst.manage("check", "--deploy", "--fail-level", "WARNING")  # DEPLOY.md: it passes with this file
    inst.manage("collectstatic", "--noinput")
    static_root = Path(inst.env["TANDEM_STATIC_ROOT"])
    assert (static_root / "js" / "tandem.js").is_file()
    assert static_root.stat().st_uid == app_uid
    inst.manage("createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com",
                DJANGO_SUPERUSER_PASSWORD="deploy-test-password-9")

    # The units: two web instances on their ports, and the agents worker.
    ports = [free_port(), free_port()]
    webs = [inst.service("tandem-web@.service", str(port)) for port in ports]
    worker = inst.service("tandem-agents.service")
    worker.start()
    for web in webs:
        web.start()
    _wait_worker(worker)
    for web, port in zip(webs, ports, strict=True):
        _wait_web(web, port)
    for process in (*webs, worker):
        assert process.proc is not None
        assert os.stat(f"/proc/{process.proc.pid}").st_uid == app_uid, f"{process.name} is not running as tandem"

    proxy: Proxy = nginx([f"127.0.0.1:{p}" for p in ports], auth_rate="1r/m", auth_burst="5")

    # HTTP/2 is offered over TLS.
    alpn = ssl.create_default_context(cafile=str(proxy.certificate))
    alpn.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5) as raw:
        with alpn.wrap_socket(raw, server_hostname=SERVER_NAME) as tls_socket:
            assert tls_socket.selected_alpn_protocol() == "h2"

    # Plain HTTP is redirected to HTTPS on the public name.
    redirect = httpx.get(f"{proxy.http}/api/sessions/?x=1", headers={"Host": SERVER_NAME}, timeout=5)
    assert redirect.status_code == 301
    assert redirect.headers["location"] == f"https://{SERVER_NAME}:{proxy.https_port}/api/sessions/?x=1"

    with proxy.client() as client:
        # Static files, from the directory collectstatic filled.
        assert client.get("/static/js/tandem.js").status_code == 200
        # uvicorn takes the client's address from nginx's X-Forwarded-For (nginx appends the
        # address it saw, 127.0.0.1 here, which uvicorn trusts; the one before it is the client's).
        assert client.get("/static/js/tandem.js?xff", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200

        # Login, a session, and a reply streamed over SSE through nginx.
        login = client.post("/api/auth/token/", json={"username": "admin", "password": "deploy-test-password-9"})
        assert login.status_code == 200, login.text
        token = login.json()["access"]
        auth = {"Authorization": f"Bearer {token}"}
        sid = client.post("/api/sessions/", json={"title": "deployed"}, headers=auth).json()["id"]
        path = f"/api/sessions/{sid}/stream/"
        stream = _sse(proxy, path, token)
        assert stream.status == 200, stream.body
        stream.wait_for_type("server.connected")
        posted = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "over tls"}]}, headers=auth)
        assert posted.status_code == 202, posted.text
        stream.wait_for_type("message.completed", message_id=posted.json()["reply_id"], timeout=15)

        # The same over a WebSocket (wss://) through nginx.
        with _wss(proxy, f"/ws/sessions/{sid}/?token={token}") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "server.connected"
            message = {"parts": [{"type": "text", "text": "over wss"}]}
            reply_id = client.post(f"/api/sessions/{sid}/messages/", json=message, headers=auth).json()["reply_id"]
            deadline = time.monotonic() + 15
            while True:
                frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if frame.get("type") == "message.completed" and frame.get("properties", {}).get("message_id") == reply_id:
                    break

        # Probes, for the load balancer: over HTTPS on the public name, and over plain HTTP
        # by IP, as load balancers probe (no redirect for them).
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        for probe in ("/healthz", "/readyz"):
            answer = httpx.get(f"{proxy.http}{probe}", timeout=5)  # Host: 127.0.0.1:port
            assert answer.status_code == 200, (probe, answer.status_code, answer.text[:200])

        # /metrics is not served through the public server blocks; Prometheus scrapes each
        # process directly, by IP.
        assert client.get("/metrics").status_code == 404
        assert httpx.get(f"{proxy.http}/metrics", headers={"Host": SERVER_NAME}, timeout=5).status_code == 301
        # certbot's renewals are served over plain HTTP, not redirected.
        assert httpx.get(f"{proxy.http}/.well-known/acme-challenge/none", headers={"Host": SERVER_NAME}, timeout=5).status_code == 404

        # PostgreSQL backup and restore: pg_dump -Fc, then pg_restore into a fresh database,
        # which a web process then serves.
        before = client.get(f"/api/sessions/{sid}/", headers=auth).json()
        dump = inst.prefix / "tandem.dump"
        with dump.open("wb") as out:
            subprocess.run(["runuser", "-u", "postgres", "--", "pg_dump", "-Fc", inst.db], stdout=out, check=True, timeout=60)
        restored = f"{inst.db}_restored"
        _run("runuser", "-u", "postgres", "--", "dropdb", "--if-exists", restored)
        _run("runuser", "-u", "postgres", "--", "createdb", "-O", "tandem", restored)
        with dump.open("rb") as source:
            subprocess.run(["runuser", "-u", "postgres", "--", "pg_restore", "-d", restored], stdin=source, check=True, timeout=60)
        query = f"SELECT title FROM sessions_app_session WHERE id = '{sid}'"
        assert _psql(query, restored) == "deployed"
        events = f"SELECT count(*) FROM events_app_event WHERE session_id = '{sid}'"
        assert int(_psql(events, restored)) == int(_psql(events, inst.db)) > 0
        restored_port = free_port()
        on_restored = inst.service("tandem-web@.service", str(restored_port))
        on_restored.env = {**inst.env, "DATABASE_URL": inst.env["DATABASE_URL"].rsplit("/", 1)[0] + f"/{restored}"}
        on_restored.start()
        _wait_web(on_restored, restored_port)
        served = httpx.get(f"http://127.0.0.1:{restored_port}/api/sessions/{sid}/", timeout=5,
                           headers={**auth, "Host": SERVER_NAME, "X-Forwarded-Proto": "https"})
        assert served.status_code == 200, served.text
        assert (served.json()["title"], served.json()["last_seq"]) == ("deployed", before["last_seq"])
        on_restored.stop()

        # An upgrade: migrate on the migrated database, then restart the web processes one
        # by one while a stream is open; it resumes exactly through nginx.
        assert "No migrations to apply" in inst.manage("migrate", "--noinput").stdout
        inst.manage("collectstatic", "--noinput")
        last = stream.seqs()[-1]
        for web, port in zip(webs, ports, strict=True):
            web.stop()
            for i in range(2):  # served by the other process meanwhile
                posted = client.post(f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}}, headers=auth)
                assert posted.status_code == 201, posted.text
            web.start()
            _wait_web(web, port)
            time.sleep(3)  # DEPLOY.md's rolling restart: nginx takes it back 2 s after its failure
        worker.stop()
        worker.start()
        _wait_worker(worker)
        head = client.get(f"/api/sessions/{sid}/", headers=auth).json()["last_seq"]
        resumed = _sse(proxy, path, token, **{"Last-Event-ID": str(last)})
        resumed.wait_for_seq(head)
        assert resumed.seqs() == list(range(last + 1, head + 1))
        # The restarted worker answers.
        message = {"parts": [{"type": "text", "text": "after the upgrade"}]}
        posted = client.post(f"/api/sessions/{sid}/messages/", json=message, headers=auth)
        resumed.wait_for_type("message.completed", message_id=posted.json()["reply_id"], timeout=15)
        resumed.close()
        stream.close()

        # The nginx side of the login rate limit: past the burst, 429 in the API's error
        # shape with Retry-After (the address is 127.0.0.1 for the whole test, so last).
        answers = [client.post("/api/auth/token/", json={}) for _ in range(12)]
        limited = [a for a in answers if a.status_code == 429]
        assert limited, [a.status_code for a in answers]
        assert limited[0].json()["error"]["code"] == "rate_limited"
        assert limited[0].headers["retry-after"] == "60"

    # JSON logs (TANDEM_LOG_FORMAT=json in the environment file): every line of every
    # process, uvicorn's own included, is one JSON object.
    for proc in (*webs, worker):
        lines = [line for line in proc.log().splitlines() if line.strip()]
        not_json = [line for line in lines if not _is_json_object(line)]
        assert lines and not not_json, not_json[:5]
    for web in webs:
        access = [json.loads(line) for line in web.log().splitlines() if line.startswith("{") and '"tandem.access"' in line]
        assert access, web.log()[-2000:]
        assert all(entry["level"] == "INFO" and entry["time"] and entry["process"] for entry in access)
        assert any(f"/api/sessions/{sid}/" in entry["message"] for entry in access)
    forwarded = [e for web in webs for e in map(json.loads, filter(lambda ln: "?xff" in ln and ln.startswith("{"), web.log().splitlines()))]
    assert forwarded and all(e["message"].startswith("203.0.113.9 ") for e in forwarded), forwarded

    # Last, because they need changes of issue 10 made on other branches: no credential in
    # any process's log (item 6, uvicorn's WebSocket lines) and Prometheus scraping each
    # process directly, by IP (item 18).
    problems = [f"{p.name} logged the access token" for p in (*webs, worker) if token in p.log()]
    for port in ports:
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        if scraped.status_code != 200 or "tandem_" not in scraped.text:
            problems.append(f"/metrics by IP on :{port} answered {scraped.status_code}")
    assert not problems, problems


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# ------------------------------------------------------------------ daphne or uvicorn


@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_streams_and_sockets_through_nginx_survive_a_dead_process(
    asgi_server: str, servers: Any, nginx: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    server_a, server_b = servers(2, redis=True, workers=1, ASGI_SERVER=asgi_server, ALLOWED_HOSTS=f"{SERVER_NAME},127.0.0.1")
    proxy: Proxy = nginx([f"127.0.0.1:{server_a.port}", f"127.0.0.1:{server_b.port}"])
    sid = shared_session.id
    path = f"/api/sessions/{sid}/stream/"

    stream = _sse(proxy, path, token_for(alice))
    stream.wait_for_type("server.connected")
    with proxy.client(headers={"Authorization": f"Bearer {token_for(bob)}"}) as client:
        message = {"parts": [{"type": "text", "text": "through the proxy"}]}
        reply_id = client.post(f"/api/sessions/{sid}/messages/", json=message).json()["reply_id"]
        # Unbuffered: the reply's events arrive while it streams, not when a buffer fills.
        stream.wait_for_type("message.completed", message_id=reply_id, timeout=10)

        with _wss(proxy, f"/ws/sessions/{sid}/?token={token_for(bob)}") as socket_:
            assert '"server.connected"' in socket_.recv(timeout=5)
            socket_.send('{"type": "ping", "id": 1}')
            frames = []
            while not any('"pong"' in f for f in frames):
                frames.append(socket_.recv(timeout=5))  # presence.joined may come first

        # One process dies; new requests and streams are served by the other.
        server_a.proc.kill()
        server_a.proc.wait()
        last = stream.seqs()[-1]
        for i in range(3):
            assert client.post(f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}}).status_code == 201
        head = client.get(f"/api/sessions/{sid}/").json()["last_seq"]
    resumed = _sse(proxy, path, token_for(alice), **{"Last-Event-ID": str(last)})
    resumed.wait_for_seq(head)
    assert resumed.seqs() == list(range(last + 1, head + 1))
    stream.close()
    resumed.close()


# ------------------------------------------------------------------ README


def test_readme_several_processes_snippet_serves_plain_http(installation: Installation, tmp_path: Path) -> None:
    """README's "Running several processes" snippet, run as written (database, Redis and
    port swapped for the test's): its uvicorn process answers over plain HTTP instead of
    redirecting every request to an HTTPS nobody listens on."""
    readme = (ROOT / "README.md").read_text()
    block = _block_after(readme, "## Running several processes")
    # The snippet's exports, evaluated by a shell as a reader's would be.
    exported = "\n".join(line for line in block.splitlines() if line.startswith("export "))
    dumped = _run("sh", "-c", f"{exported}\nenv -0", env={"PATH": os.environ["PATH"]}).stdout
    exports = dict(item.split("=", 1) for item in dumped.split("\0") if "=" in item)
    for name in ("PATH", "PWD", "SHLVL", "_"):
        exports.pop(name, None)
    commands = [line for line in block.splitlines() if "uvicorn" in line]
    assert commands, "the snippet starts no uvicorn process"
    assert "daphne" not in block
    inst = installation
    port = free_port()
    argv = shlex.split(commands[0].rstrip("&").strip().replace(".venv/bin/uvicorn", f"{sys.executable} -m uvicorn"))
    argv[argv.index("--port") + 1] = str(port)
    env = {**os.environ, **exports, "DATABASE_URL": f"postgres://tandem@/{inst.db}", "REDIS_URL": REDIS_URL,
           "TANDEM_CHANNEL_PREFIX": inst.env["TANDEM_CHANNEL_PREFIX"], "PYTHONUNBUFFERED": "1"}
    _run(sys.executable, "manage.py", "migrate", "--noinput", cwd=inst.app, env=env)
    log = tmp_path / "readme.log"
    proc = subprocess.Popen(argv, cwd=inst.app, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/sessions/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert answer.status_code == 401, (answer.status_code, answer.headers.get("location"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------ the renderer


@pytest.mark.parametrize(
    "option, value",
    [("--upstream", "http://127.0.0.1:8001"), ("--upstream", "127.0.0.1:8001; evil"),
     ("--server-name", "https://tandem.example.com"), ("--auth-rate", "lots")],
)
def test_render_nginx_refuses_what_it_cannot_place(option: str, value: str) -> None:
    args = {"--server-name": "tandem.example.com", "--upstream": "127.0.0.1:8001",
            "--certificate": "/c.pem", "--certificate-key": "/k.pem", option: value}
    result = _run("python3", str(DEPLOY / "render_nginx.py"), *[x for kv in args.items() for x in kv], check=False)
    assert result.returncode == 2 and value in result.stderr, result.stderr
    assert result.stdout == ""
