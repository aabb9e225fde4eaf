"""The tools agents may use. A tool is a plain, synchronous function of a JSON object
(or, for tools of MCP servers, ``mcp_tools``, a coroutine function);
the runner asks permission when ``needs_permission`` is set, runs it off the event loop
and reports its status. Agents name tools; they never call them directly.

A tool that works on the reply's session (the shared document's ``doc_read`` and
``doc_edit``) needs the sessions domain, a layer above this one: its module adds it with
``add`` when the app starts (``sessions_app.doc_tools``), and it runs as
``session_run(session_id, input)``."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jsonschema
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
    # Rules the schema cannot state because function calling refuses them at its top level
    # (oneOf, not): checked with it, before permission is asked; raises ToolFailed.
    refine: Callable[[dict[str, Any]], None] | None = None
    # Set for a tool that works on the reply's session: run instead of ``run``, through
    # the ORM's thread pool (``project.db.off_loop``).
    session_run: Callable[[str, dict[str, Any]], Any] | None = None
    # A tool that waits on the network (an MCP server's) is a coroutine instead: the
    # runner cancels it on timeout or abort, which a thread cannot be.
    arun: Callable[[dict[str, Any]], Awaitable[Any]] | None = None
    timeout: float | None = None  # seconds; None: TANDEM_TOOL_TIMEOUT

    @cached_property
    def _validator(self) -> jsonschema.protocols.Validator:
        """The validator of the draft the schema names (2020-12 when it names none); a
        schema that is itself invalid fails here, at the first call, not silently."""
        cls = jsonschema.validators.validator_for(self.parameters, default=jsonschema.Draft202012Validator)
        cls.check_schema(self.parameters)
        return cls(self.parameters)

    def check_input(self, input: Any) -> dict[str, Any]:
        """The input, if it matches the tool's schema; ToolFailed otherwise (a model's
        arguments are untrusted). The message names the first problem, in the order a
        person fixes them: not an object, unknown arguments, missing ones, then the rest."""
        errors = sorted(self._validator.iter_errors(input), key=_error_rank)
        if errors:
            raise ToolFailed(_describe(errors[0]))
        if self.refine is not None:
            self.refine(input)
        return dict(input)


_RANK = {"type": 0, "additionalProperties": 1, "required": 2}


def _error_rank(error: jsonschema.ValidationError) -> tuple[int, int, str]:
    return (len(error.absolute_path), _RANK.get(str(error.validator), 3), str(list(error.absolute_path)))


def _describe(error: jsonschema.ValidationError) -> str:
    """One line for the user and the model; the phrasing the tools had before their
    schemas were checked by jsonschema, for the cases it covered."""
    path = ".".join(str(p) for p in error.absolute_path)
    if not path and error.validator == "type":
        return "The tool's input must be a JSON object."
    if not path and error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        unknown = sorted(k for k in error.instance if k not in known)
        if unknown:
            return f"Unknown argument(s): {', '.join(unknown)}."
    if not path and error.validator == "required":
        missing = [n for n in error.validator_value if isinstance(error.instance, dict) and n not in error.instance]
        if missing:
            return f"Missing argument: {missing[0]}."
    if path and error.validator == "type" and isinstance(error.validator_value, str):
        article = "an" if error.validator_value[:1] in "aeiou" else "a"
        return f"Argument {path} must be {article} {error.validator_value}."
    return f"Argument {path}: {error.message}." if path else f"{error.message}."


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


def add(tool: Tool) -> None:
    """Make ``tool`` known to the agents (from a module above this layer, at start-up)."""
    TOOLS[tool.name] = tool
