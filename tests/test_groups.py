"""Channel-layer group names and the messages sent through them come from one module,
``events_app/groups.py``: names Channels accepts, controls that survive the trip as the
same typed value, and no other module that builds a group name or reads one back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from channels.layers import BaseChannelLayer

from events_app import groups
from sessions_app.models import new_id, new_permission_id, new_session_id

ROOT = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = ("project", "events_app", "sessions_app")

CONTROLS: list[groups.Control] = [
    groups.Wake(),
    groups.Abort(new_id("msg")),
    groups.PermissionAnswered(new_id("msg"), new_permission_id()),
    groups.Revoke(user_id=2**63 - 1, session_id=new_session_id()),
    groups.UserDisabled(7),
    groups.KeyRevoked(7, "0" * 64),
    groups.Join(session_id=new_session_id(), after=41),
]


def test_every_group_name_is_one_channels_accepts() -> None:
    layer = BaseChannelLayer()
    names = [
        groups.session_group(new_session_id()),
        groups.user_group(2**63 - 1),
        groups.pool_group("host-1.example.com:4242:a1b2c3"),
        groups.pool_group("host-1.example.com:4242:a1b2c4"),
        groups.pool_group("é" * 300),  # a runner name is any text: the group is a digest of it
        groups.WORKERS_GROUP,
    ]
    for name in names:
        assert layer.require_valid_group_name(name)
    assert layer.require_valid_channel_name(groups.HUB_CHANNEL_PREFIX + "abc123")
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("session_id", ["ses bad", "ses/1", "sés", "s" * 100])
def test_a_name_channels_would_refuse_fails_where_it_is_built(session_id: str) -> None:
    with pytest.raises(ValueError):
        groups.session_group(session_id)


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: c.action)
def test_every_control_decodes_to_what_was_encoded(control: groups.Control) -> None:
    message = groups.encode_control(groups.WORKERS_GROUP, control)
    assert message["type"] == groups.CONTROL and message["g"] == groups.WORKERS_GROUP
    assert groups.decode_control(message) == control


def test_a_control_this_version_does_not_know_decodes_to_nothing() -> None:
    # Another version's message during a rolling deploy: ignored, never a crash.
    assert groups.decode_control({"type": groups.CONTROL, "g": "x", "action": "reticulate"}) is None
    revoke = groups.encode_control("x", groups.Revoke(user_id=1, session_id=new_id("ses")))
    del revoke["session_id"]
    assert groups.decode_control(revoke) is None


def _group_markers() -> set[str]:
    """The fixed part of every name groups.py makes, and the message types."""
    return {
        groups.session_group("X").removesuffix("X"),
        groups.user_group(7).removesuffix("7"),
        groups.pool_group("X")[: len("tandem.p.")],
        groups.WORKERS_GROUP,
        groups.HUB_CHANNEL_PREFIX,
        groups.EVENT,
        groups.EVENTS,
        groups.CONTROL,
    }


def test_no_other_module_builds_or_parses_a_group_name() -> None:
    markers = _group_markers()
    own = ROOT / "events_app" / "groups.py"
    found = []
    for package in SERVER_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == own or "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                # f-string pieces are Constants too, so f"tandem.s.{sid}" is caught.
                if (
                    isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and any(node.value.startswith(m) for m in markers)
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []
