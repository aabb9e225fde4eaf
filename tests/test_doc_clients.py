"""The shared document from the Python SDK (sync and async) and ``tandem doc get|set|append``,
against a real server process: reading, replacing, appending, edits with versions, and the
bad cases (an outsider, a viewer writing, a stale version, a position out of range)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sessions_app import doc as docs
from tandem_client import (
    AsyncClient,
    ConflictError,
    DocEdit,
    Document,
    NotFoundError,
    PermissionDeniedError,
    TandemError,
    ValidationError,
)
from tests.conftest import PASSWORD
from tests.test_cli import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, Tandem, tandem  # noqa: F401
from tests.test_sdk import client_for

pytestmark = [pytest.mark.slow]


def test_sdk_reads_sets_appends_and_edits_the_document(servers: Any, shared_session: Any, alice: Any, bob: Any) -> None:
    (server,) = servers(1)
    sid = shared_session.id
    with client_for(server, bob) as editor:
        empty = editor.get_doc(sid)
        assert isinstance(empty, Document) and (empty.text, empty.version) == ("", 0)

        first = editor.set_doc(sid, "# Plan\n\nShip Monday.")
        assert first.text == "# Plan\n\nShip Monday." and first.version > 0
        assert editor.get_doc(sid) == first

        edited = editor.edit_doc(sid, [DocEdit(13, 6, "Friday"), {"at": 0, "insert": "👋 "}], version=first.version)
        assert edited.text == "👋 # Plan\n\nShip Friday." and edited.version > first.version

        appended = editor.append_doc(sid, "Then rest.")
        assert appended.text == "👋 # Plan\n\nShip Friday.\n\nThen rest."

        replaced = editor.set_doc(sid, "👋 # Plan\n\nShip Sunday.\n\nThen rest.")  # the smallest edit
        assert replaced.text == "👋 # Plan\n\nShip Sunday.\n\nThen rest."
    assert docs.read_doc(sid).text == replaced.text


def test_sdk_bad_cases_have_their_codes(servers: Any, shared_session: Any, alice: Any, carol: Any, charlie: Any) -> None:
    (server,) = servers(1, TANDEM_MAX_DOC_CHARS="50")
    sid = shared_session.id
    with client_for(server, alice) as owner:
        with pytest.raises(TandemError) as too_long:
            owner.set_doc(sid, "x" * 51)
        assert (too_long.value.status, too_long.value.code) == (413, "payload_too_large")
        start = owner.set_doc(sid, "one")
        owner.append_doc(sid, "two")  # the document moves on
        with pytest.raises(ConflictError) as stale:
            owner.edit_doc(sid, [DocEdit(0, 3, "uno")], version=start.version)
        assert (stale.value.status, stale.value.code) == (409, "version_conflict")
        with pytest.raises(ConflictError) as stale_set:
            owner.set_doc(sid, "replaced", version=start.version)
        assert stale_set.value.code == "version_conflict"
        with pytest.raises(ValidationError) as out_of_range:
            owner.edit_doc(sid, [DocEdit(999, 0, "x")])
        assert out_of_range.value.status == 400
        assert owner.get_doc(sid).text == "one\n\ntwo"  # none of it applied

    with client_for(server, carol) as viewer:
        assert viewer.get_doc(sid).text == "one\n\ntwo"
        for write in (lambda: viewer.set_doc(sid, "mine"), lambda: viewer.append_doc(sid, "mine"),
                      lambda: viewer.edit_doc(sid, [DocEdit(0, 0, "mine")])):
            with pytest.raises(PermissionDeniedError) as denied:
                write()
            assert (denied.value.status, denied.value.code) == (403, "permission_denied")

    with client_for(server, charlie) as outsider:
        for call in (lambda: outsider.get_doc(sid), lambda: outsider.append_doc(sid, "x"),
                     lambda: outsider.edit_doc(sid, [DocEdit(0, 0, "x")])):
            with pytest.raises(NotFoundError):
                call()
    assert docs.read_doc(sid).text == "one\n\ntwo"


def test_async_sdk_document(servers: Any, shared_session: Any, bob: Any) -> None:
    (server,) = servers(1)
    sid = shared_session.id

    async def main() -> None:
        async with AsyncClient(server.url, username="bob", password=PASSWORD) as client:
            assert (await client.get_doc(sid)).text == ""
            await client.set_doc(sid, "alpha")
            await client.append_doc(sid, "beta")
            edited = await client.edit_doc(sid, [DocEdit(0, 5, "ALPHA")])
            assert edited.text == "ALPHA\n\nbeta"
            with pytest.raises(ConflictError):
                await client.set_doc(sid, "x", version=0)

    asyncio.run(main())


def test_cli_doc_get_set_append(servers: Any, shared_session: Any, bob: Any, carol: Any, charlie: Any,
                                tandem: Tandem) -> None:
    (server,) = servers(1)
    sid = shared_session.id
    tandem.login(server, bob)

    empty = tandem.run("doc", "get", sid)
    assert empty.returncode == 0 and empty.stdout == ""
    written = tandem.run("doc", "set", sid, "# Notes")
    assert written.returncode == 0, written.stderr
    assert "version" in written.stderr and written.stdout == ""
    piped = tandem.run("doc", "append", sid, input="From stdin, *kept*.\n")
    assert piped.returncode == 0, piped.stderr
    assert tandem.run("doc", "append", sid, "Last line.").returncode == 0
    shown = tandem.run("doc", "get", sid)
    assert shown.stdout == "# Notes\n\nFrom stdin, *kept*.\n\nLast line.\n"
    as_json = json.loads(tandem.run("doc", "get", sid, "--json").stdout)
    assert as_json["text"] == "# Notes\n\nFrom stdin, *kept*.\n\nLast line." and as_json["version"] > 0

    stale = tandem.run("doc", "set", sid, "gone", "--version", "1")
    assert stale.returncode == EXIT_FAILED and "version_conflict" in stale.stderr
    current = tandem.run("doc", "set", sid, "-", "--version", str(as_json["version"]), "--json", input="Replaced\n")
    assert current.returncode == 0, current.stderr
    assert json.loads(current.stdout)["text"] == "Replaced\n"

    assert tandem.run("doc", "append", sid, "  ").returncode == EXIT_USAGE
    assert tandem.run("doc", "set", sid, "x", "--version", "-1").returncode == EXIT_USAGE
    assert tandem.run("doc", "get").returncode == EXIT_USAGE
    assert tandem.run("doc", "remove", sid).returncode == EXIT_USAGE

    tandem.login(server, carol)
    denied = tandem.run("doc", "append", sid, "viewer text")
    assert denied.returncode == EXIT_FAILED and "permission_denied" in denied.stderr
    assert tandem.run("doc", "get", sid).stdout == "Replaced\n"

    tandem.login(server, charlie)
    missing = tandem.run("doc", "get", sid)
    assert missing.returncode == EXIT_NOT_FOUND and sid in missing.stderr
    assert tandem.run("doc", "set", sid, "x").returncode == EXIT_NOT_FOUND
    assert docs.read_doc(sid).text == "Replaced\n"
