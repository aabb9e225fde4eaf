"""Agents register here by name; ``Session.agent`` names one."""
from __future__ import annotations

from sessions_app.agents.base import Agent

_AGENTS: dict[str, type[Agent]] = {}


def register(cls: type[Agent]) -> type[Agent]:
    _AGENTS[cls.name] = cls
    return cls


def names() -> list[str]:
    _load_builtins()
    return sorted(_AGENTS)


def create(name: str) -> Agent:
    _load_builtins()
    return _AGENTS[name]()


def _load_builtins() -> None:
    # Each module registers its agents when imported.
    from sessions_app.agents import echo, openai, tools_agent  # noqa: F401
