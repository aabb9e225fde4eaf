"""The ``tandem`` command as a real subprocess (``python -m tandem_client``) against real
daphne processes: login and its config file, chat output and exit codes, watch across a
server restart, permissions answered from the command line, and clear failures."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from events_app.publishing import publish_event
from sessions_app.models import Message, Session
from tests.conftest import PASSWORD, ROOT, ServerProcess, wait_until
from tests.test_sdk import restart  # noqa: F401
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow]

EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NETWORK, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130


class Tandem:
    """Runs ``tandem`` with its own config directory."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        self.env.update(TANDEM_CONFIG_DIR=str(config_dir), PYTHONIOENCODING="utf-8")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tandem_client", *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=ROOT, env=self.env, input=input, capture_output=True, text=True,
            timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
            start_new_session=True,  # no controlling terminal: prompts read the piped stdin
        )

    def start(self, *args: str, **kwargs: Any) -> Running:
        return Running(subprocess.Popen(
            self.argv(*args), cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            **{"stdin": subprocess.DEVNULL, **kwargs},
        ))

    def login(self, server: ServerProcess, user: Any) -> None:
        result = self.run("login", "--url", server.url, "--username", user.username, "--password", PASSWORD)
        assert result.returncode == 0, result.stderr


class Running:
    """A ``tandem`` process whose output is read as it comes, with bounded waits."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.out = b""
        self.err = b""
        self._cond = threading.Condition()
        self._pumps = [threading.Thread(target=self._pump, args=(pipe, name), daemon=True)
                       for pipe, name in ((proc.stdout, "out"), (proc.stderr, "err"))]
        for pump in self._pumps:
            pump.start()

    def _pump(self, pipe: Any, name: str) -> None:
        for chunk in iter(lambda: pipe.read1(65536), b""):
            with self._cond:
                setattr(self, name, getattr(self, name) + chunk)
                self._cond.notify_all()

    @property
    def stdout(self) -> str:
        return self.out.decode()

    @property
    def stderr(self) -> str:
        return self.err.decode()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"not within {timeout}s\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}")
                self._cond.wait(min(remaining, 0.5))

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def finish(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout=timeout)
        for pump in self._pumps:  # the pipes reach EOF once the process is gone
            pump.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tandem(tmp_path: Path) -> Iterator[Tandem]:
    cli = Tandem(tmp_path / "config")
    yield cli


@pytest.fixture
def running() -> Iterator[Callable[[Running], Running]]:
    started: list[Running] = []

    def track(process: Running) -> Running:
        started.append(process)
        return process

    yield track
    for process in started:
        process.kill()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def reply_status(reply_id: str) -> str | None:
    status = Message.objects.filter(pk=reply_id).values_list("status", flat=True).first()
    return status if status != "streaming" else None


# ---------------------------------------------------------------- login and listing


def test_login_with_flags_saves_a_private_config_that_other_commands_use(
    servers: Any, shared_session: Session, alice: Any, tandem: Tandem
) -> None:
    (server,) = servers(1)
    result = tandem.run("login", "--url", server.url + "/", "--username", "alice", "--password", PASSWORD)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Logged in to {server.url} as alice.\n"
    path = tandem.config_dir / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert set(saved) == {"url", "username", "refresh"}
    assert (saved["url"], saved["username"]) == (server.url, "alice") and saved["refresh"]
    assert PASSWORD not in path.read_text()

    listing = tandem.run("sessions")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert header.split() == ["ID", "TITLE", "AGENT", "STATUS", "ROLE"]
    assert row.split() == [shared_session.id, "Fix", "the", "login", "bug", "echo", "idle", "owner"]

    created = tandem.run("new", "Second session", "--agent", "tools", "--json")
    assert created.returncode == 0, created.stderr
    session = json.loads(created.stdout)
    assert (session["title"], session["agent"], session["role"]) == ("Second session", "tools", "owner")
    plain = tandem.run("new", "Third")
    assert plain.returncode == 0 and Session.objects.filter(pk=plain.stdout.strip(), title="Third").exists()
    assert [s["id"] for s in json.loads(tandem.run("sessions", "--json").stdout)][0] == plain.stdout.strip()


def test_login_prompts_for_what_is_missing(servers: Any, alice: Any, tandem: Tandem) -> None:
    (server,) = servers(1)
    result = tandem.run("login", "--url", server.url, input=f"alice\n{PASSWORD}\n")
    assert result.returncode == 0, result.stderr
    assert "Username" in result.stderr and "Password" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert json.loads((tandem.config_dir / "config.json").read_text())["username"] == "alice"


def test_an_api_key_in_the_environment_needs_no_login(
    servers: Any, shared_session: Session, bob: Any, tandem: Tandem
) -> None:
    from sessions_app import services

    (server,) = servers(1)
    key, raw = services.create_api_key(bob, "ci")
    tandem.env["TANDEM_API_KEY"] = raw
    nowhere = tandem.run("sessions")
    assert nowhere.returncode == EXIT_USAGE and "give the server with --url or TANDEM_URL" in nowhere.stderr
    tandem.env["TANDEM_URL"] = server.url
    chat = tandem.run("chat", shared_session.id, "hello from CI")  # REST and the event stream
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "hello from CI\n"
    assert not (tandem.config_dir / "config.json").exists()
    services.revoke_api_key(bob, key.pk)
    refused = tandem.run("sessions")
    assert refused.returncode == EXIT_AUTH and "revoked" in refused.stderr


# ---------------------------------------------------------------- chat


def test_chat_with_echo_prints_exactly_the_sent_text(
    servers: Any, shared_session: Session, bob: Any, tandem: Tandem
) -> None:
    (server,) = servers(1)
    tandem.login(server, bob)
    text = "fix the  bug — naïve ünïcode,\ttabs\nand a second line"
    result = tandem.run("chat", shared_session.id, text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    assert result.stderr == ""


def test_chat_reads_the_message_from_stdin(servers: Any, shared_session: Session, bob: Any, tandem: Tandem) -> None:
    (server,) = servers(1)
    tandem.login(server, bob)
    result = tandem.run("chat", shared_session.id, input="piped in\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "piped in\n"


def test_chat_json_prints_every_event_as_a_json_line_until_the_reply_completes(
    servers: Any, shared_session: Session, bob: Any, tandem: Tandem
) -> None:
    (server,) = servers(1)
    tandem.login(server, bob)
    head = Session.objects.get(pk=shared_session.pk).last_seq
    result = tandem.run("chat", shared_session.id, "as json lines", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["type"] == "server.connected" and events[0]["properties"]["resumed"] is True
    persisted = [e for e in events if e["seq"] is not None]
    assert [e["seq"] for e in persisted] == list(range(head + 1, head + 1 + len(persisted)))
    assert persisted[0]["type"] == "message.created" and persisted[0]["properties"]["message"]["role"] == "user"
    last = events[-1]
    assert last["type"] == "message.completed" and last["properties"]["status"] == "completed"
    reply_id = last["properties"]["message_id"]
    deltas = "".join(e["properties"].get("delta", "") for e in events
                     if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id)
    assert deltas == "as json lines"


def test_chat_exits_1_when_the_reply_is_cancelled_by_someone_else(
    servers: Any, shared_session: Session, alice: Any, bob: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="30")
    tandem.login(server, bob)
    chat = running(tandem.start("chat", shared_session.id, words(300)))
    chat.wait_for(lambda: chat.out.startswith(b"w0"))
    with api_client(server, alice) as client:
        assert client.post(f"/api/sessions/{shared_session.id}/abort/", json={}).json() == {"aborted": True}
    assert chat.finish() == EXIT_FAILED
    assert "Reply cancelled." in chat.stderr
    assert words(300).startswith(chat.stdout.rstrip("\n")) and chat.stdout.endswith("\n")

    # And with --if-busy reject, a message into a busy session is refused with the server's reason.
    with api_client(server, alice) as client:
        client.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": words(300)}]})
        busy = tandem.run("chat", "--if-busy", "reject", shared_session.id, "me too")
        client.post(f"/api/sessions/{shared_session.id}/abort/", json={})
    assert busy.returncode == EXIT_FAILED
    assert "[session_busy]" in busy.stderr and busy.stdout == ""


def test_chat_into_a_busy_session_queues_and_prints_only_its_own_reply(
    servers: Any, shared_session: Session, alice: Any, bob: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="30")
    tandem.login(server, bob)
    with api_client(server, alice) as client:
        # Long enough (about 6 s) to be still running while the CLI starts and queues.
        first = client.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": words(200)}]})
        assert first.json()["reply_id"]
        chat = running(tandem.start("chat", shared_session.id, "my turn"))
        chat.wait_for(lambda: "queued: position 1" in chat.stderr)
        # Someone else queues behind bob: bob's chat ends with bob's reply, not theirs.
        behind = client.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": "after bob"}]})
        assert behind.json()["position"] == 2, behind.text
    assert chat.finish(timeout=30) == 0, chat.stderr
    assert chat.stdout == "my turn\n"
    assert reply_status(first.json()["reply_id"]) == "completed"


def test_withdraw_and_retry_commands(
    servers: Any, shared_session: Session, alice: Any, bob: Any, tandem: Tandem
) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="20")
    tandem.login(server, bob)
    assert tandem.run("chat", shared_session.id, "again please").returncode == 0
    retried = tandem.run("retry", shared_session.id)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == "again please\n"
    replies = list(Message.objects.filter(session=shared_session, role="assistant").order_by("turn_at"))
    assert len(replies) == 2 and replies[0].superseded_by_id == replies[1].pk
    with api_client(server, alice) as client:
        client.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": words(300)}]})
        mine = client.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": "x"}]})
        queued_id = mine.json()["message"]["id"]
        refused = tandem.run("withdraw", shared_session.id, queued_id)  # bob is not its author
        assert refused.returncode == EXIT_FAILED and "[permission_denied]" in refused.stderr
        with api_client(server, bob) as as_bob:
            bobs = as_bob.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": "y"}]})
        bobs_id = bobs.json()["message"]["id"]
        withdrawn = tandem.run("withdraw", shared_session.id, bobs_id)
        assert withdrawn.returncode == 0 and withdrawn.stdout == f"Withdrew {bobs_id}.\n", withdrawn.stderr
        assert not Message.objects.filter(pk=bobs_id).exists()
        client.post(f"/api/sessions/{shared_session.id}/abort/", json={})
    wait_until(lambda: Message.objects.filter(pk=queued_id, status="completed").exists(), timeout=10)
    late = tandem.run("withdraw", shared_session.id, queued_id)  # alice's, no longer queued
    assert late.returncode == EXIT_FAILED and "[permission_denied]" in late.stderr


def test_ctrl_c_during_chat_aborts_the_reply_and_exits_130(
    servers: Any, shared_session: Session, bob: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="30")
    tandem.login(server, bob)
    chat = running(tandem.start("chat", shared_session.id, words(300)))
    chat.wait_for(lambda: chat.out.startswith(b"w0"))
    reply_id = Message.objects.filter(session=shared_session, role="assistant").values_list("id", flat=True).get()
    chat.proc.send_signal(signal.SIGINT)
    assert chat.finish() == EXIT_INTERRUPTED
    assert "aborting the reply" in chat.stderr
    assert wait_until(lambda: reply_status(reply_id), timeout=5) == "cancelled"


# ---------------------------------------------------------------- permissions


@pytest.fixture
def tools_session(shared_session: Session) -> Session:
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    shared_session.refresh_from_db()
    return shared_session


def test_approve_resolves_a_tools_permission(
    servers: Any, tools_session: Session, alice: Any, bob: Any, tandem: Tandem
) -> None:
    (server,) = servers(1)
    sid = tools_session.id
    tandem.login(server, alice)
    with api_client(server, bob) as client:
        posted = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "!calc 2*(3+4)"}]})
        assert posted.status_code == 202, posted.text
        reply_id = posted.json()["reply_id"]

        def pending() -> list[dict[str, Any]]:
            return client.get(f"/api/sessions/{sid}/permissions/", params={"status": "pending"}).json()  # type: ignore[no-any-return]

        (permission,) = wait_until(pending, timeout=10)
        listed = tandem.run("permissions", sid)
        assert listed.returncode == 0 and permission["id"] in listed.stdout and "calculator" in listed.stdout

        result = tandem.run("approve", sid, permission["id"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == f'Approved: calculator {{"expression":"2*(3+4)"}} ({permission["id"]})\n'
        assert wait_until(lambda: reply_status(reply_id), timeout=10) == "completed"
        reply = client.get(f"/api/sessions/{sid}/messages/").json()["results"][-1]
        assert reply["id"] == reply_id and reply["parts"][-1]["text"] == "2*(3+4) = 14"

        again = tandem.run("approve", sid, permission["id"], "--reject", "--reason", "too late")
        assert again.returncode == EXIT_FAILED and "[already_resolved]" in again.stderr


def test_chat_shows_tool_status_and_a_rejected_permission_on_stderr(
    servers: Any, tools_session: Session, bob: Any, alice: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1)
    sid = tools_session.id
    tandem.login(server, bob)
    chat = running(tandem.start("chat", sid, "!calc 1/0"))
    hint = chat.wait_for(lambda: next((line for line in chat.stderr.splitlines() if "tandem approve" in line), None))
    permission_id = hint.split()[-2]
    other = Tandem(tandem.config_dir.parent / "alice")
    other.login(server, alice)
    assert other.run("approve", sid, permission_id, "--reject", "--reason", "not today").returncode == 0
    assert chat.finish() == 0
    assert "[permission] rejected by alice: not today" in chat.stderr
    assert "[tool] calculator: error" in chat.stderr
    assert "not run" in chat.stdout.lower() or "did not run" in chat.stdout.lower()


def test_chat_answers_a_permission_prompt_inline_on_a_terminal(
    servers: Any, tools_session: Session, bob: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1)
    tandem.login(server, bob)
    controller, terminal = os.openpty()
    try:
        chat = running(tandem.start("chat", tools_session.id, "!calc 2*(3+4)", stdin=terminal))
        chat.wait_for(lambda: "Allow it? [y/N]" in chat.stderr)
        os.write(controller, b"y\n")
        assert chat.finish() == 0, chat.stderr
    finally:
        os.close(terminal)
        os.close(controller)
    assert chat.stdout == "2*(3+4) = 14\n"
    assert "[permission] approved by bob" in chat.stderr
    assert "[tool] calculator: completed -> 14" in chat.stderr


# ---------------------------------------------------------------- watch and publish


def test_watch_survives_a_server_restart_and_prints_every_event_once(
    servers: Any, restart: Any, shared_session: Session, alice: Any, bob: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1)
    sid = shared_session.id
    tandem.login(server, alice)
    head = Session.objects.get(pk=sid).last_seq
    # From the known head, so events published while watch starts up are not "before" it.
    watch = running(tandem.start("watch", sid, "--json", "--types", "task.*", "--after", str(head)))

    def seqs() -> list[int]:
        return [e["seq"] for e in watch.json_lines() if e["seq"] is not None]

    with api_client(server, bob) as client:
        for i in range(3):
            client.post(f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}})
    watch.wait_for(lambda: len(seqs()) == 3)

    server.stop()
    for i in range(3, 5):  # while no server runs
        publish_event(sid, "task.progress", {"i": i}, as_user="bob")
    replacement = restart(server)
    with api_client(replacement, bob) as client:
        for i in range(5, 8):
            client.post(f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}})
    watch.wait_for(lambda: len(seqs()) >= 8, timeout=30)
    watch.proc.send_signal(signal.SIGINT)
    assert watch.finish() == EXIT_INTERRUPTED
    assert seqs() == list(range(head + 1, head + 9))
    assert [e["properties"]["i"] for e in watch.json_lines()] == list(range(8))
    assert "[reconnected; resuming after seq" in watch.stderr


def test_watch_prints_readable_lines_and_replays_with_after(
    servers: Any, shared_session: Session, alice: Any, tandem: Tandem, running: Any
) -> None:
    (server,) = servers(1)
    tandem.login(server, alice)
    published = tandem.run("publish", shared_session.id, "task.progress", '{"progress": 50}')
    assert published.returncode == 0, published.stderr
    seq = int(published.stdout.split()[-1].rstrip("."))
    assert published.stdout == f"Published task.progress as seq {seq}.\n"
    watch = running(tandem.start("watch", shared_session.id, "--after", str(seq - 1)))
    line = watch.wait_for(lambda: next((ln for ln in watch.stdout.splitlines() if "task.progress" in ln), None))
    assert line.split()[0] == str(seq) and line.endswith('{"progress":50,"published_by":{"id":%d,"username":"alice"}}' % alice.pk)


def test_publish_rejects_bad_json_before_sending(servers: Any, shared_session: Session, alice: Any, tandem: Tandem) -> None:
    (server,) = servers(1)
    tandem.login(server, alice)
    head = Session.objects.get(pk=shared_session.pk).last_seq
    bad = tandem.run("publish", shared_session.id, "task.progress", "{progress: 50}")
    assert bad.returncode == EXIT_USAGE
    assert "not valid JSON" in bad.stderr and bad.stdout == ""
    not_object = tandem.run("publish", shared_session.id, "task.progress", "[1, 2]")
    assert not_object.returncode == EXIT_USAGE and "must be a JSON object" in not_object.stderr
    reserved = tandem.run("publish", shared_session.id, "message.fake", "{}")
    assert reserved.returncode == EXIT_FAILED and "[validation_error]" in reserved.stderr
    assert Session.objects.get(pk=shared_session.pk).last_seq == head


# ---------------------------------------------------------------- failures


def test_failures_have_clear_messages_and_distinct_exit_codes(
    servers: Any, shared_session: Session, alice: Any, charlie: Any, tandem: Tandem
) -> None:
    (server,) = servers(1)
    not_logged_in = tandem.run("sessions")
    assert not_logged_in.returncode == EXIT_AUTH and "Not logged in" in not_logged_in.stderr

    unreachable = tandem.run("login", "--url", "http://127.0.0.1:1", "-u", "alice", "-p", PASSWORD)
    assert unreachable.returncode == EXIT_NETWORK
    assert "Cannot reach http://127.0.0.1:1" in unreachable.stderr
    malformed = tandem.run("login", "--url", "localhost-without-scheme", "-u", "alice", "-p", PASSWORD)
    assert malformed.returncode == EXIT_NETWORK and "Not a server URL" in malformed.stderr

    wrong = tandem.run("login", "--url", server.url, "-u", "alice", "-p", "not the password")
    assert wrong.returncode == EXIT_AUTH
    assert "Login failed for 'alice'" in wrong.stderr and "[authentication_failed]" in wrong.stderr
    assert not (tandem.config_dir / "config.json").exists()

    tandem.login(server, charlie)
    for args in (("chat", "ses_does_not_exist", "hello"), ("watch", "ses_does_not_exist"),
                 ("chat", shared_session.id, "hello")):  # alice's session: charlie is no member
        missing = tandem.run(*args)
        assert missing.returncode == EXIT_NOT_FOUND, (args, missing.stderr)
        assert f"Session {args[1]} was not found" in missing.stderr
    assert not Message.objects.filter(session=shared_session).exists()

    moved = tandem.run("sessions", "--url", "http://127.0.0.1:1")
    assert moved.returncode == EXIT_NETWORK and "Cannot reach" in moved.stderr
    usage = tandem.run("chat")
    assert usage.returncode == EXIT_USAGE and "Missing argument 'SESSION'" in usage.stderr

    (tandem.config_dir / "config.json").write_text(json.dumps({"url": server.url, "username": "charlie", "refresh": "forged"}))
    expired = tandem.run("sessions")
    assert expired.returncode == EXIT_AUTH and "log in again" in expired.stderr
