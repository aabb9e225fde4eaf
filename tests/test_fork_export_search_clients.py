"""Fork, export and search from the Python SDK (sync and async) and the ``tandem``
command, against a real server process."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tandem_client import AsyncClient, NotFoundError, Session, ValidationError
from tandem_client.sdk import SearchHit
from tests.conftest import PASSWORD
from tests.replies import wait_idle
from tests.test_cli import EXIT_NOT_FOUND, EXIT_USAGE, Tandem, tandem  # noqa: F401
from tests.test_sdk import client_for

pytestmark = [pytest.mark.slow]


def converse(server: Any, user: Any, *texts: str, title: str = "Plans") -> str:
    """A session of ``user`` where the echo agent answered each text."""
    with client_for(server, user) as client:
        session = client.create_session(title)
        for text in texts:
            client.send_message(session.id, text)
            wait_idle(session.id)
        return session.id


def test_sdk_forks_exports_and_searches(servers: Any, alice: Any, charlie: Any) -> None:
    (server,) = servers(1)
    session_id = converse(server, alice, "the zeppelin leaves at noon", "bring the map")
    with client_for(server, alice) as client:
        messages = client.messages(session_id)
        fork = client.fork_session(session_id, message_id=messages[1].id, title="Just the zeppelin")
        assert isinstance(fork, Session) and fork.role == "owner" and fork.title == "Just the zeppelin"
        assert fork.forked_from == {"session_id": session_id, "message_id": messages[1].id}
        assert [m.text for m in client.messages(fork.id)] == ["the zeppelin leaves at noon"] * 2
        with pytest.raises(ValidationError):
            client.fork_session(session_id, message_id="x" * 40)

        transcript = client.export(session_id)
        assert transcript.startswith("# Plans\n") and "bring the map" in transcript
        exported = client.export_json(session_id)
        assert [m["id"] for m in exported["messages"]] == [m.id for m in messages]
        with pytest.raises(ValidationError):
            client.export(session_id, "pdf")

        hits = client.search("zeppelin")
        assert all(isinstance(h, SearchHit) for h in hits)
        assert {h.session_id for h in hits} == {session_id, fork.id}
        # The fork's title matches too, and a title weighs more than a message.
        assert (hits[0].session_id, hits[0].message_id, hits[0].marked()) == (fork.id, None, "Just the [zeppelin]")
        assert {h.message_id for h in hits[1:]} == {messages[0].id, messages[1].id} | {
            m.id for m in client.messages(fork.id)
        }
        assert len(client.search("zeppelin", max_results=1)) == 1
        with pytest.raises(ValidationError):
            client.search("")
    with client_for(server, charlie) as outsider:
        assert outsider.search("zeppelin") == []
        with pytest.raises(NotFoundError):
            outsider.export(session_id)
        with pytest.raises(NotFoundError):
            outsider.fork_session(session_id)


def test_async_sdk_forks_exports_and_searches(servers: Any, alice: Any) -> None:
    (server,) = servers(1)
    session_id = converse(server, alice, "albatross sighting")

    async def main() -> None:
        async with AsyncClient(server.url, username="alice", password=PASSWORD) as client:
            fork = await client.fork_session(session_id)
            assert fork.forked_from is not None and fork.forked_from["session_id"] == session_id
            assert "albatross sighting" in await client.export(fork.id)
            assert set(await client.export_json(fork.id)) == {"session", "members", "messages", "permissions"}
            hits = await client.search("albatross")
            assert {h.session_id for h in hits} == {session_id, fork.id}

    asyncio.run(main())


def test_cli_fork_export_search(servers: Any, alice: Any, tandem: Tandem, tmp_path: Path) -> None:  # noqa: F811
    (server,) = servers(1)
    session_id = converse(server, alice, "the platypus is a mammal")
    tandem.login(server, alice)

    forked = tandem.run("fork", session_id, "--title", "Forked")
    assert forked.returncode == 0, forked.stderr
    fork_id = forked.stdout.strip()
    as_json = json.loads(tandem.run("fork", session_id, "--json").stdout)
    assert as_json["forked_from"]["session_id"] == session_id
    missing = tandem.run("fork", session_id, "--message", "msg_missing")
    assert missing.returncode == EXIT_NOT_FOUND and "msg_missing" in missing.stderr

    exported = tandem.run("export", fork_id)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("# Forked\n") and "the platypus is a mammal" in exported.stdout
    target = tmp_path / "out.json"
    written = tandem.run("export", session_id, "--format", "json", "-o", str(target))
    assert written.returncode == 0, written.stderr
    assert len(json.loads(target.read_text())["messages"]) == 2
    assert tandem.run("export", session_id, "--format", "pdf").returncode == EXIT_USAGE
    assert tandem.run("export", "ses_nope").returncode == EXIT_NOT_FOUND

    found = tandem.run("search", "platypus")
    assert found.returncode == 0, found.stderr
    assert "[platypus]" in found.stdout and fork_id in found.stdout and session_id in found.stdout
    hits = json.loads(tandem.run("search", "platypus", "--json", "--limit", "2").stdout)
    assert len(hits) == 2 and all(h["snippet"] for h in hits)
    nothing = tandem.run("search", "okapi")
    assert nothing.returncode == 0 and nothing.stdout == "" and "Nothing found" in nothing.stderr
    assert tandem.run("search", "x" * 201).returncode == 1
