"""Agents register here by name; ``Session.agent`` names one."""
from __future__ import annotations

from sessions_app.agents.base import AGENTS, Agent, register

__all__ = ["commands", "create", "names", "register"]


def names() -> list[str]:
    _load_builtins()
    return sorted(AGENTS)


def create(name: str) -> Agent:
    _load_builtins()
    return AGENTS[name]()


def commands(name: str) -> list[dict[str, str]]:
    """The agent's commands as ``{"usage", "command", "description"}`` (none for an agent
    this server does not know)."""
    _load_builtins()
    agent = AGENTS.get(name)
    if agent is None:
        return []
    return [{"usage": usage, "command": usage.split(" ", 1)[0], "description": text} for usage, text in agent.commands]


def _load_builtins() -> None:
    # Each module registers its agents when imported.
    from sessions_app.agents import echo, openai, tools_agent  # noqa: F401
