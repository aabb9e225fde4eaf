"""A tool's input is checked against its JSON Schema (jsonschema) before permission is
asked: the messages the user and the model read, for the built-in tools and for the
richer schemas other tools may bring."""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from sessions_app.agents.tools import TOOLS, Tool, ToolFailed


def message(tool: Tool, input: Any) -> str:
    with pytest.raises(ToolFailed) as caught:
        tool.check_input(input)
    return str(caught.value)


@pytest.mark.parametrize("input", [[1, 2], "2+2", None, 3])
def test_input_that_is_not_an_object_is_refused(input: Any) -> None:
    assert message(TOOLS["calculator"], input) == "The tool's input must be a JSON object."


def test_unknown_arguments_are_named_before_missing_ones() -> None:
    calculator = TOOLS["calculator"]
    assert message(calculator, {"_invalid_arguments": "{x", "b": 1}) == "Unknown argument(s): _invalid_arguments, b."
    assert message(TOOLS["time"], {"zone": "UTC"}) == "Unknown argument(s): zone."


def test_a_missing_argument_is_named() -> None:
    assert message(TOOLS["calculator"], {}) == "Missing argument: expression."


@pytest.mark.parametrize("value", [3, None, ["1+1"], {"e": "1"}, True])
def test_an_argument_of_the_wrong_type_is_named(value: Any) -> None:
    assert message(TOOLS["calculator"], {"expression": value}) == "Argument expression must be a string."


def test_valid_input_is_returned() -> None:
    assert TOOLS["calculator"].check_input({"expression": "1+1"}) == {"expression": "1+1"}
    assert TOOLS["time"].check_input({}) == {}


RICH = Tool(
    name="rich",
    description="A schema with what the built-in tools do not use.",
    parameters={
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 1},
            "mode": {"enum": ["fast", "slow"]},
            "target": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
        "required": ["count"],
    },
    needs_permission=False,
    run=lambda input: input,
)


def test_nested_objects_bounds_and_enums_are_checked() -> None:
    assert message(RICH, {"count": 0}) == "Argument count: 0 is less than the minimum of 1."
    assert message(RICH, {"count": 1.5}) == "Argument count must be an integer."
    assert message(RICH, {"count": 1, "mode": "medium"}) == "Argument mode: 'medium' is not one of ['fast', 'slow']."
    assert message(RICH, {"count": 1, "target": {}}) == "Argument target: 'path' is a required property."
    assert message(RICH, {"count": 1, "target": {"path": 7}}) == "Argument target.path must be a string."


def test_without_additional_properties_false_extra_arguments_pass() -> None:
    assert RICH.check_input({"count": 2, "extra": True}) == {"count": 2, "extra": True}


def test_a_tool_whose_schema_is_invalid_fails_loudly() -> None:
    broken = Tool("broken", "", {"type": "object", "properties": {"a": {"type": "no-such-type"}}}, False, lambda i: i)
    with pytest.raises(jsonschema.SchemaError):
        broken.check_input({})
