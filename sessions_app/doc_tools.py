"""The shared document's tools for agents (PROTOCOL §10): ``doc_read`` and ``doc_edit``.

They live here, in the sessions domain, because they read and write through
``sessions_app.doc``; ``register`` adds them to the agents' tools when the app starts
(``SessionsAppConfig.ready``). The runner runs them through ``off_loop`` with the reply's
session. ``doc_edit`` needs permission like every writing tool, and writes as the agent:
open editors see the change at once and ``doc.updated`` says ``by: "agent"``.
"""
from __future__ import annotations

from typing import Any

from project.errors import ApiError, VersionConflict
from sessions_app import doc as docs
from sessions_app.agents import tools
from sessions_app.agents.tools import Tool, ToolFailed

_EDIT = {
    "type": "object",
    "properties": {
        "at": {"type": "integer", "minimum": 0, "description": "Position, in Unicode code points."},
        "delete": {"type": "integer", "minimum": 0, "description": "Code points to delete at `at` (default 0)."},
        "insert": {"type": "string", "description": "Text to insert at `at` (default none)."},
    },
    "required": ["at"],
    "additionalProperties": False,
}

DOC_READ = "doc_read"
DOC_EDIT = "doc_edit"


def _read(session_id: str, input: dict[str, Any]) -> dict[str, Any]:
    state = docs.read_doc(session_id)
    return {"text": state.text, "version": state.version}


def _one_way(input: dict[str, Any]) -> None:
    if ("append" in input) == ("edits" in input):
        raise ToolFailed("Give either append or edits.")
    if "append" in input and "version" in input:
        raise ToolFailed("version goes with edits; append always adds at the end.")


def _edit(session_id: str, input: dict[str, Any]) -> dict[str, Any]:
    try:
        if "append" in input:
            state = docs.append_paragraph(docs.AGENT, session_id, input["append"])
        else:
            state = docs.apply_edits(docs.AGENT, session_id, input["edits"], input.get("version"))
    except VersionConflict as exc:
        current = exc.details.get("version")
        raise ToolFailed(
            f"The document has changed since version {input.get('version')}"
            + (f" (it is at version {current})" if current is not None else "")
            + ": read it again with doc_read."
        ) from None
    except ApiError as exc:  # out of range, too long, the session gone
        # The details say where an edit went wrong (the text's length then): the model
        # needs them to correct itself.
        where = exc.details.get("edits")
        raise ToolFailed(" ".join([exc.message, *(map(str, where) if isinstance(where, list) else [])])) from None
    return {"version": state.version, "chars": len(state.text)}


def _unscoped(input: dict[str, Any]) -> Any:
    raise ToolFailed("This tool works on a session's document.")


DOC_TOOLS = (
    Tool(
        name=DOC_READ,
        description="Read the session's shared document (Markdown): its text and version.",
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
        needs_permission=False,
        run=_unscoped,
        session_run=_read,
    ),
    Tool(
        name=DOC_EDIT,
        description=(
            "Change the session's shared document (Markdown); the people in the session approve it first. "
            "Either `append`: text added as a new paragraph at the end. Or `edits`: [{at, delete, insert}] "
            "applied in order, positions in Unicode code points of the text at that moment, with the "
            "`version` doc_read gave, so that a document someone changed since is not edited blindly."
        ),
        parameters={
            "type": "object",
            "properties": {
                "append": {"type": "string", "minLength": 1, "description": "A paragraph to add at the end."},
                "edits": {"type": "array", "minItems": 1, "maxItems": 100, "items": _EDIT},
                "version": {"type": "integer", "minimum": 0, "description": "The version the edits are for."},
            },
            "additionalProperties": False,
        },
        needs_permission=True,
        run=_unscoped,
        refine=_one_way,
        session_run=_edit,
    ),
)


def register() -> None:
    for tool in DOC_TOOLS:
        tools.add(tool)
