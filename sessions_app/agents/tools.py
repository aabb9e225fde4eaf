"""The tools agents may use. A tool is a plain, synchronous function of a JSON object
(or, for tools of MCP servers, ``mcp_tools``, a coroutine function);
the runner asks permission when ``needs_permission`` is set, runs it off the event loop
and reports its status. Agents name tools; they never call them directly."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.utils import timezone


class ToolFailed(Exception):
    """The tool ran and could not produce a result; the message is shown to the user."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of ``input``, as function calling wants it
    needs_permission: bool
    run: Callable[[dict[str, Any]], Any]
    # A tool that waits on the network (an MCP server's) is a coroutine instead: the
    # runner cancels it on timeout or abort, which a thread cannot be.
    arun: Callable[[dict[str, Any]], Awaitable[Any]] | None = None
    timeout: float | None = None  # seconds; None: TANDEM_TOOL_TIMEOUT

    def check_input(self, input: Any) -> dict[str, Any]:
        """The input, if its shape is right; ToolFailed otherwise (a model's arguments
        are untrusted)."""
        if not isinstance(input, dict):
            raise ToolFailed("The tool's input must be a JSON object.")
        properties = self.parameters.get("properties", {})
        unknown = sorted(set(input) - set(properties))
        if unknown:
            raise ToolFailed(f"Unknown argument(s): {', '.join(unknown)}.")
        for name in self.parameters.get("required", []):
            if name not in input:
                raise ToolFailed(f"Missing argument: {name}.")
        for name, value in input.items():
            if properties[name].get("type") == "string" and not isinstance(value, str):
                raise ToolFailed(f"Argument {name} must be a string.")
        return input


def _calculator(input: dict[str, Any]) -> int | float:
    from sessions_app.agents.calculator import CalculatorError, evaluate

    try:
        return evaluate(input["expression"])
    except CalculatorError as exc:
        raise ToolFailed(str(exc)) from exc


def _time(input: dict[str, Any]) -> str:
    return timezone.now().isoformat().replace("+00:00", "Z")


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            name="calculator",
            description=(
                "Evaluate an arithmetic expression with + - * / ** and parentheses; "
                "numbers only, no names."
            ),
            parameters={
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 2*(3+4)"}},
                "required": ["expression"],
                "additionalProperties": False,
            },
            needs_permission=True,
            run=_calculator,
        ),
        Tool(
            name="time",
            description="The server's current time (UTC, RFC 3339).",
            parameters={"type": "object", "properties": {}, "additionalProperties": False},
            needs_permission=False,
            run=_time,
        ),
    )
}


def get(name: str) -> Tool | None:
    return TOOLS.get(name)
