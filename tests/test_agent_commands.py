"""The agent's commands that the session page offers as hints while someone types "!"."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from sessions_app.agents import registry
from sessions_app.models import Session
from tests.conftest import PASSWORD


def test_the_tools_agent_lists_its_commands() -> None:
    assert [c["command"] for c in registry.commands("tools")] == ["!calc", "!time", "!doc", "!mcp"]
    assert registry.commands("tools")[0]["usage"] == "!calc <expression>"


def test_agents_without_commands_and_unknown_agents_list_none() -> None:
    assert registry.commands("echo") == []
    assert registry.commands("no-such-agent") == []


def page_commands(user: Any, session: Session) -> list[dict[str, str]]:
    client = Client()
    assert client.login(username=user.get_username(), password=PASSWORD)
    html = client.get(f"/s/{session.id}/").content.decode()
    found = re.search(r'<script id="agent-commands" type="application/json">(.*?)</script>', html, re.S)
    assert found, "the page embeds the agent's commands"
    return json.loads(found.group(1))  # type: ignore[no-any-return]


@pytest.mark.django_db
def test_the_session_page_carries_its_agents_commands(shared_session: Session, carol: Any) -> None:
    assert page_commands(carol, shared_session) == []
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    assert [c["command"] for c in page_commands(carol, shared_session)] == ["!calc", "!time", "!doc", "!mcp"]
