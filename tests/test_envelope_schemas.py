"""The suite's envelope check (tests/envelopes.py) and the event declarations it rests on:
a wrong-shaped event is found, and fails the test that encoded it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from events_app import services as event_services
from events_app import types
from sessions_app.models import Message, Role
from tests import envelopes

ROOT = Path(__file__).resolve().parent.parent
USER = {"id": 1, "username": "ada"}
TIME = "2025-01-01T00:00:00Z"


def envelope(type_name: str, properties: Any, seq: int | None = 4, **extra: Any) -> str:
    return orjson.dumps(
        {"seq": seq, "session_id": "ses_1", "type": type_name, "time": TIME, "properties": properties, **extra}
    ).decode()


def test_conforming_envelopes_pass() -> None:
    assert envelopes.problem(envelope("member.added", {"user": USER, "role": "editor"})) is None
    assert envelopes.problem(envelope("task.progress", {"pct": 40, "published_by": USER})) is None
    connected = {"connection_id": "con_1", "last_seq": None, "resumed": False, "cursor": "abc"}
    assert envelopes.problem(envelope("server.connected", connected, seq=None)) is None


@pytest.mark.parametrize(
    ("type_name", "properties", "seq", "where"),
    [
        ("member.added", {"user": USER, "role": "admin"}, 4, "properties/role"),  # not a role
        ("member.added", {"user": {"id": "1", "username": "ada"}, "role": "editor"}, 4, "properties/user"),
        ("member.added", {"user": USER, "role": "editor"}, None, "seq"),  # persisted: has a seq
        ("session.status", {"status": {"type": "sleeping"}}, 4, "properties/status"),
        ("message.completed", {"message_id": "msg_1", "status": "done"}, 4, "properties/status"),
        ("tool.status", {"message_id": "m", "call_id": "c", "tool": "t", "status": "ok"}, 4, "properties/status"),
        ("task.progress", [40], 4, "properties"),  # custom events: the envelope only
        ("Task.progress", {"pct": 40}, 4, "type"),
        ("task.progress", {"pct": 40}, None, "seq"),
    ],
)
def test_a_wrong_value_is_found(type_name: str, properties: Any, seq: int | None, where: str) -> None:
    found = envelopes.problem(envelope(type_name, properties, seq=seq))
    assert found is not None and where in found, found


def test_encode_is_replaced_everywhere_and_records_what_is_wrong() -> None:
    assert types.encode is envelopes.checked_encode
    assert event_services.encode is envelopes.checked_encode  # type: ignore[attr-defined]  # imported there by name
    before = len(envelopes.problems)
    made = types.encode(
        seq=4, session_id="ses_1", type_name="member.added", time=TIME,
        properties={"user": USER, "role": "admin"},
    )
    try:
        assert orjson.loads(made)["properties"]["role"] == "admin"  # still made and sent
        assert len(envelopes.problems) == before + 1
        assert "properties/role" in envelopes.problems[-1]
    finally:
        del envelopes.problems[before:]  # this test's own bad envelope is not a failure
    with pytest.raises(ValueError, match="undeclared"):  # names stay checked by encode itself
        types.encode(seq=4, session_id="ses_1", type_name="member.added", time=TIME,
                     properties={"user": USER, "role": "editor", "extra": 1})


def test_a_test_that_encodes_a_wrong_envelope_fails(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "from events_app.types import encode\n"
        "def encoded(role):\n"
        "    return encode(seq=4, session_id='ses_1', type_name='member.added', time='2025-01-01T00:00:00Z',\n"
        "                  properties={'user': {'id': 1, 'username': 'ada'}, 'role': role})\n"
        "def test_good():\n"
        "    encoded('editor')\n"
        "def test_bad():\n"
        "    encoded('admin')\n"
        "@pytest.mark.bad_envelopes\n"
        "def test_bad_on_purpose():\n"
        "    encoded('admin')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_sample.py"), "-p", "tests.envelopes",
         "-p", "no:cacheprovider", "-q", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert "1 failed, 2 passed" in run.stdout, run.stdout + run.stderr
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].split(" ")[1].endswith("::test_bad"), run.stdout
    assert "properties/role" in run.stdout


def test_the_declared_enums_are_the_models_choices() -> None:
    # events_app cannot import the sessions domain's choices; they must still agree.
    assert types.ROLE["enum"] == list(Role.values)
    assert types.MESSAGE_STATUS["enum"] == list(Message.Status.values)
    assert set(types.referenced_components()) >= {"User", "Session", "Message", "Permission"}
