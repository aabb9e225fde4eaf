"""The agent interface.

An agent is one class with an async generator ``reply(ctx)``. It yields typed outputs
(text, reasoning, usage, retry notices) and, when it wants a tool, awaits
``ctx.use_tool(...)``. It never touches rows or events: the runner turns outputs into
parts, events and persistence, asks for permission, runs the tool and reports its status.
An agent that fails raises ``AgentError`` with a code; the message then ends ``error``.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    """Token counts reported by a provider; recorded on the assistant message."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Retrying:
    """The agent is waiting before retry ``attempt``; shown as ``session.status retry``
    until the agent's next output."""

    attempt: int
    message: str
    next_at: datetime


Output = TextDelta | ReasoningDelta | Usage | Retrying


class AgentError(Exception):
    """A failure the agent can name: the message ends ``error`` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolResult:
    """What ``use_tool`` returns. ``ok`` is False when the tool failed, or did not run
    because permission was rejected or expired (``rejected`` says which)."""

    ok: bool
    output: Any = None
    error: str | None = None
    rejected: bool = False


class ToolUser(Protocol):
    async def __call__(
        self, tool: str, input: dict[str, Any], call_id: str | None = None
    ) -> ToolResult: ...


@dataclass(frozen=True)
class DocumentText:
    """The session's shared document as the agent sees it: its Markdown and the version
    that text is (for ``doc_edit``'s ``version``)."""

    text: str
    version: int


class DocumentReader(Protocol):
    async def __call__(self) -> DocumentText | None: ...


async def _no_document() -> DocumentText | None:
    return None


async def _no_tools(tool: str, input: dict[str, Any], call_id: str | None = None) -> ToolResult:
    return ToolResult(ok=False, error="Tools are not available here.")


@dataclass(frozen=True)
class ReplyContext:
    """What an agent sees. ``history`` is the session's messages before this reply,
    oldest first: ``{"role": "user"|"assistant", "text": str}``. ``read_document()`` is
    the session's shared document now (None where there is none, as in unit tests)."""

    session_id: str
    message_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    use_tool: ToolUser = _no_tools
    read_document: DocumentReader = _no_document

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.history):
            if message["role"] == "user":
                return str(message["text"])
        return ""


class Agent:
    name: ClassVar[str]
    # The commands the agent understands, as (usage, what it does): the session page
    # offers them as hints while someone types a message starting with "!".
    commands: ClassVar[tuple[tuple[str, str], ...]] = ()

    def reply(self, ctx: ReplyContext) -> AsyncIterator[Output]:
        raise NotImplementedError


# Agents by name, filled by ``register``. It lives here, not in ``registry``, so an
# agent's module imports only this one and the registry can import the built-in agents
# without an import cycle.
AGENTS: dict[str, type[Agent]] = {}


def register(cls: type[Agent]) -> type[Agent]:
    """Class decorator: make the agent known by its ``name``."""
    AGENTS[cls.name] = cls
    return cls
