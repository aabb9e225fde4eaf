"""Tools of outside MCP servers for Tandem's agents: a real MCP server
(``tests/mcp_test_server.py``) started over stdio for each call. The ``tools`` agent
calls them with ``!mcp <server>.<tool> <json>``; the ``openai`` agent is offered them.
They take the same permission flow as the built-in tools, show as tool parts with
``tool.status``, and are bounded by the timeout and by abort; a crashing or hanging
server gives a tool error and the reply goes on."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from project.settings import env_mcp_servers
from sessions_app.agents import mcp_tools
from sessions_app.models import Message, PermissionRequest, Session
from tests.conftest import client_for, token_for, wait_until
from tests.fake_openai import FakeOpenAI, fake_openai, stream, text_chunks, tool_call  # noqa: F401  (a fixture)
from tests.replies import head, log_after, post, wait_for_completed, wait_for_event, wait_idle
from tests.test_tools_agent import answer, ask, reply_text, tool_statuses

SERVER_SCRIPT = str(Path(__file__).with_name("mcp_test_server.py"))

pytestmark = [pytest.mark.django_db(transaction=True)]


def configure(monkeypatch: Any, settings: Any, **servers: dict[str, Any]) -> None:
    """Configure through the real setting's parser, as a deployment does."""
    monkeypatch.setenv("TANDEM_MCP_SERVERS", json.dumps(servers))
    settings.TANDEM_MCP_SERVERS = env_mcp_servers("TANDEM_MCP_SERVERS")
    mcp_tools.forget_listings()


@pytest.fixture
def pidfile(tmp_path: Path) -> Path:
    return tmp_path / "mcp.pids"


@pytest.fixture
def mcp_session(shared_session: Session, monkeypatch: Any, settings: Any, pidfile: Path) -> Session:
    """alice's ``tools`` session, with the test server configured as ``test``: ``add``
    needs permission (the default), the others are allowed without asking."""
    settings.TANDEM_TOOL_TIMEOUT = 30.0  # a cold Python start on a busy machine is slow
    free = {"needs_permission": False}
    configure(
        monkeypatch, settings,
        test={
            "command": sys.executable, "args": [SERVER_SCRIPT],
            "env": {"MCP_TEST_PIDFILE": str(pidfile)},
            "tools": {"shout": free, "fail": free, "crash": free, "hang": free},
        },
    )
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    shared_session.refresh_from_db()
    yield shared_session
    mcp_tools.forget_listings()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def pids(pidfile: Path) -> list[int]:
    return [int(line) for line in pidfile.read_text().split()] if pidfile.exists() else []


def run(user: Any, session: Session, text: str, timeout: float = 60.0) -> tuple[str, list[dict[str, Any]]]:
    before = head(session.id)
    response = post(user, session.id, text)
    assert response.status_code == 202, response.content
    reply_id = response.json()["reply_id"]
    completed = wait_for_completed(session.id, before, reply_id, timeout=timeout)
    assert completed["properties"]["status"] == "completed"
    wait_idle(session.id)
    return reply_text(reply_id), log_after(session.id, before)


def last_status(events: list[dict[str, Any]]) -> dict[str, Any]:
    return [e for e in events if e["type"] == "tool.status"][-1]["properties"]


# ---------------------------------------------------------------- the tools agent


def test_approved_mcp_tool_runs_and_answers(mcp_session: Session, bob: Any, alice: Any) -> None:
    before, reply_id, permission = ask(bob, mcp_session, '!mcp test.add {"a": 2, "b": 40}')
    assert permission["tool"] == "test.add"
    assert permission["input"] == {"a": 2, "b": 40}
    assert answer(alice, mcp_session, permission["id"], approved=True).status_code == 200
    wait_for_completed(mcp_session.id, before, reply_id, timeout=60)
    events = log_after(mcp_session.id, before)
    assert tool_statuses(events) == ["pending", "running", "completed"]
    done = last_status(events)
    assert done["tool"] == "test.add" and done["output"] == {"result": 42}
    assert reply_text(reply_id) == 'test.add: {"result": 42}'


def test_rejected_mcp_tool_is_not_run(mcp_session: Session, bob: Any, pidfile: Path) -> None:
    before, reply_id, permission = ask(bob, mcp_session, '!mcp test.add {"a": 1, "b": 1}')
    answer(bob, mcp_session, permission["id"], approved=False, reason="no")
    wait_for_completed(mcp_session.id, before, reply_id)
    assert tool_statuses(log_after(mcp_session.id, before)) == ["pending", "error"]
    assert "did not run test.add" in reply_text(reply_id)
    assert pids(pidfile) == []  # the server was never started


def test_tool_allowed_without_asking_runs_at_once(mcp_session: Session, bob: Any) -> None:
    text, events = run(bob, mcp_session, '!mcp test.shout {"text": "hi there"}')
    assert not [e for e in events if e["type"].startswith("permission.")]
    assert tool_statuses(events) == ["pending", "running", "completed"]
    assert text == 'test.shout: {"result": "HI THERE"}'


def test_error_result_becomes_a_tool_error(mcp_session: Session, bob: Any) -> None:
    text, events = run(bob, mcp_session, '!mcp test.fail {"why": "disk full"}')
    assert tool_statuses(events) == ["pending", "running", "error"]
    assert "disk full" in last_status(events)["error"]
    assert text.startswith("test.fail failed:") and "disk full" in text


def test_arguments_the_server_refuses_give_a_tool_error(mcp_session: Session, bob: Any) -> None:
    text, events = run(bob, mcp_session, '!mcp test.shout {"words": 1}')
    assert last_status(events)["status"] == "error"
    assert "text" in last_status(events)["error"]  # the server names the missing argument


def test_crashing_server_gives_a_tool_error_and_the_agent_goes_on(mcp_session: Session, bob: Any) -> None:
    text, events = run(bob, mcp_session, "!mcp test.crash {}")
    assert tool_statuses(events) == ["pending", "running", "error"]
    assert "MCP server 'test' failed" in last_status(events)["error"]
    assert text.startswith("test.crash failed:")
    # The next call starts a fresh server.
    text, _ = run(bob, mcp_session, '!mcp test.shout {"text": "again"}')
    assert text == 'test.shout: {"result": "AGAIN"}'


def test_hanging_server_times_out_and_its_process_ends(
    mcp_session: Session, bob: Any, settings: Any, monkeypatch: Any, pidfile: Path
) -> None:
    configure(
        monkeypatch, settings,
        test={
            "command": sys.executable, "args": [SERVER_SCRIPT], "timeout": 8,
            "env": {"MCP_TEST_PIDFILE": str(pidfile)}, "needs_permission": False,
        },
    )
    text, events = run(bob, mcp_session, "!mcp test.hang {}")
    assert tool_statuses(events) == ["pending", "running", "error"]
    assert last_status(events)["error"] == "The tool took longer than 8 s."
    assert text.startswith("test.hang failed:")
    [pid] = pids(pidfile)
    assert wait_until(lambda: not alive(pid), timeout=10)


def test_abort_cancels_a_hanging_call(mcp_session: Session, bob: Any, alice: Any, pidfile: Path) -> None:
    before = head(mcp_session.id)
    reply_id = post(bob, mcp_session.id, "!mcp test.hang {}").json()["reply_id"]
    wait_for_event(
        mcp_session.id, before, "tool.status", lambda e: e["properties"]["status"] == "running"
    )
    assert wait_until(lambda: pids(pidfile), timeout=30)  # the server is up
    aborted_at = time.monotonic()
    response = client_for(alice).post(f"/api/sessions/{mcp_session.id}/abort/", {}, format="json")
    assert response.json() == {"aborted": True}
    completed = wait_for_completed(mcp_session.id, before, reply_id, timeout=10)
    assert completed["properties"]["status"] == "cancelled"
    assert time.monotonic() - aborted_at < 10
    assert tool_statuses(log_after(mcp_session.id, before))[-1] == "error"
    [pid] = pids(pidfile)
    assert wait_until(lambda: not alive(pid), timeout=10)


def test_unknown_server_or_tool_name(mcp_session: Session, bob: Any) -> None:
    text, events = run(bob, mcp_session, "!mcp nowhere.add {}")
    assert last_status(events)["error"] == "There is no tool named 'nowhere.add'."
    text, events = run(bob, mcp_session, "!mcp test {}")
    assert last_status(events)["error"] == "There is no tool named 'test'."


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_arguments_are_refused_before_the_server(mcp_session: Session, bob: Any, arguments: str, pidfile: Path) -> None:
    text, events = run(bob, mcp_session, f"!mcp test.shout {arguments}")
    if arguments.startswith("{"):
        assert text == f"The arguments for test.shout are not JSON: {arguments}"
        assert tool_statuses(events) == []
    else:
        assert last_status(events)["error"] == "Invalid input: The tool's input must be a JSON object."
    assert pids(pidfile) == []


def test_pending_mcp_request_is_listed_like_any_other(mcp_session: Session, bob: Any, carol: Any) -> None:
    before, reply_id, permission = ask(bob, mcp_session, '!mcp test.add {"a": 1, "b": 2}')
    listed = client_for(carol).get(f"/api/sessions/{mcp_session.id}/permissions/?status=pending").json()
    assert [p["id"] for p in listed] == [permission["id"]]
    client_for(bob).post(f"/api/sessions/{mcp_session.id}/abort/", {}, format="json")
    wait_for_completed(mcp_session.id, before, reply_id)
    assert PermissionRequest.objects.get(pk=permission["id"]).status == "rejected"
    assert Message.objects.get(pk=reply_id).status == "cancelled"


def test_a_streamable_http_server_with_headers(
    mcp_session: Session, bob: Any, alice: Any, settings: Any, monkeypatch: Any, servers: Any
) -> None:
    """Tandem's own /mcp/ (a real server process) as the agents' HTTP MCP server: the
    configured Authorization header is what lets the call in."""
    # Worker mode: that process must not claim this test's replies (its pool polls the
    # shared database); they run here, where the servers are configured.
    [live] = servers(1, TANDEM_AGENT_MODE="worker")
    url = f"{live.url}/mcp/"
    configure(
        monkeypatch, settings,
        tandem={"url": url, "headers": {"Authorization": f"Bearer {token_for(alice)}"}, "needs_permission": False},
        anonymous={"url": url, "needs_permission": False},
    )
    text, events = run(bob, mcp_session, "!mcp tandem.list_sessions {}")
    assert tool_statuses(events) == ["pending", "running", "completed"]
    sessions = last_status(events)["output"]["sessions"]
    assert [(s["id"], s["role"]) for s in sessions] == [(mcp_session.id, "owner")]
    text, events = run(bob, mcp_session, "!mcp anonymous.list_sessions {}")
    assert last_status(events)["status"] == "error"
    assert "MCP server 'anonymous' failed" in last_status(events)["error"]


# ---------------------------------------------------------------- the openai agent's offer


async def test_openai_agent_is_offered_the_servers_tools(mcp_session: Session) -> None:
    offered = {tool.name: tool for tool in await mcp_tools.offered()}
    assert set(offered) == {"test.add", "test.shout", "test.fail", "test.crash", "test.hang"}
    add = offered["test.add"]
    assert add.description == "Add two integers."
    assert add.parameters["properties"] == {
        "a": {"title": "A", "type": "integer"}, "b": {"title": "B", "type": "integer"},
    }
    assert add.needs_permission and not offered["test.shout"].needs_permission
    assert mcp_tools.function_name(add) == "test__add"


def test_openai_agent_calls_an_mcp_tool_through_the_runner(
    mcp_session: Session, bob: Any, fake_openai: FakeOpenAI  # noqa: F811  (the fixture)
) -> None:
    Session.objects.filter(pk=mcp_session.pk).update(agent="openai")
    fake_openai.script(
        stream(tool_call(0, id="c1", name="test__shout", arguments='{"text": "quiet"}'), text_chunks()[-1]),
        stream(*text_chunks("It says QUIET.")),
    )
    text, events = run(bob, mcp_session, "Shout 'quiet' with the tool.")
    assert text == "It says QUIET."
    assert tool_statuses(events) == ["pending", "running", "completed"]
    done = last_status(events)
    assert done["tool"] == "test.shout" and done["output"] == {"result": "QUIET"}
    first, second = fake_openai.requests
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert {"calculator", "time", "test__add", "test__shout", "test__hang"} <= set(offered)
    assert offered["test__shout"]["parameters"]["required"] == ["text"]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": '{"result": "QUIET"}'}


async def test_a_server_that_cannot_start_offers_nothing(settings: Any, monkeypatch: Any) -> None:
    configure(monkeypatch, settings, broken={"command": "/nonexistent/mcp-server"})
    assert await mcp_tools.offered() == []


# ---------------------------------------------------------------- the setting


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("not json", "is not JSON"),
        ("[]", "must be a JSON object"),
        ('{"a.b": {"command": "x"}}', "server name"),
        ('{"s": {}}', "exactly one of command or url"),
        ('{"s": {"command": "x", "url": "http://h/"}}', "exactly one of command or url"),
        ('{"s": {"command": "x", "needs_permision": false}}', "unknown key(s) needs_permision"),
        ('{"s": {"command": "x", "args": "a b"}}', "list of strings"),
        ('{"s": {"command": "x", "env": {"A": 1}}}', "object of strings"),
        ('{"s": {"url": "ftp://h/"}}', "http(s) URL"),
        ('{"s": {"command": "x", "needs_permission": "no"}}', "needs_permission must be"),
        ('{"s": {"command": "x", "timeout": 0}}', "timeout must be"),
        ('{"s": {"command": "x", "tools": {"t": {"needs_permission": 0}}}}', "tools.t must be"),
    ],
)
def test_bad_mcp_server_settings_fail_loudly(monkeypatch: Any, value: str, complaint: str) -> None:
    monkeypatch.setenv("TANDEM_MCP_SERVERS", value)
    with pytest.raises(ImproperlyConfigured) as caught:
        env_mcp_servers("TANDEM_MCP_SERVERS")
    assert complaint in str(caught.value)


def test_mcp_server_settings_parse_with_defaults(monkeypatch: Any) -> None:
    monkeypatch.setenv(
        "TANDEM_MCP_SERVERS",
        '{"web": {"url": "https://mcp.example/mcp", "headers": {"Authorization": "Bearer k"}, "timeout": 5,'
        ' "tools": {"fetch": {"needs_permission": false}}}}',
    )
    assert env_mcp_servers("TANDEM_MCP_SERVERS") == {
        "web": {
            "transport": "http", "url": "https://mcp.example/mcp", "headers": {"Authorization": "Bearer k"},
            "needs_permission": True, "timeout": 5.0, "tools": {"fetch": {"needs_permission": False}},
        }
    }
    monkeypatch.delenv("TANDEM_MCP_SERVERS")
    assert env_mcp_servers("TANDEM_MCP_SERVERS") == {}
