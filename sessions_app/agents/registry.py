"""Agents register here by name; ``Session.agent`` names one."""
from __future__ import annotations

from sessions_app.agents.base import AGENTS, Agent, register

__all__ = ["create", "names", "register"]


def names() -> list[str]:
    _load_builtins()
    return sorted(AGENTS)


def create(name: str) -> Agent:
    _load_builtins()
    return AGENTS[name]()


def _load_builtins() -> None:
    # Each module registers its agents when imported.
    from sessions_app.agents import echo, openai, tools_agent  # noqa: F401
