"""A pytest plugin: every envelope the server encodes during the tests (``events_app.types.
encode``, the one encoding) is validated against its schema in the OpenAPI document (its
event type's component, ``CustomEvent`` for custom types), and the test during which a
non-conforming envelope was made fails, in the phase (setup, call, teardown) that made it.

The envelope is still returned and sent: an exception inside ``encode`` could be swallowed
by whatever task sent the event, and the test would pass. The document is generated once,
on the first envelope; each component's validator is compiled once."""
from __future__ import annotations

import copy
import functools
import sys
import threading
from collections.abc import Generator
from typing import Any

import jsonschema
import orjson
import pytest

from events_app import types

_encode = types.encode
problems: list[str] = []
_lock = threading.Lock()


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema objects -> JSON Schema (``nullable`` is the one difference
    that matters here)."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-")}
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def validator_for(document: dict[str, Any], name: str) -> jsonschema.Validator:
    """A validator for the component ``name`` of an OpenAPI document."""
    root = to_json_schema({"components": {"schemas": document["components"]["schemas"]}})
    root["$ref"] = f"#/components/schemas/{name}"
    return jsonschema.Draft7Validator(root)


@functools.cache
def _document() -> dict[str, Any]:
    from project.openapi import TandemSchemaGenerator

    return TandemSchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-untyped-call,no-any-return]


GENERIC = "CustomEvent"


@functools.cache
def _validator(component: str) -> jsonschema.Validator:
    with _lock:  # envelopes are encoded on several threads; the document is made once
        document = _document()
        if component == GENERIC:
            # Custom events: the envelope only. Their properties are the publisher's, and
            # ``published_by`` is added by the publishing API, which tests often bypass.
            document = copy.deepcopy(document)
            document["components"]["schemas"][GENERIC]["properties"]["properties"] = {"type": "object"}
        return validator_for(document, component)


def problem(envelope: str) -> str | None:
    """What is wrong with ``envelope`` according to the OpenAPI document, or None."""
    from project.openapi import event_component_name

    data = orjson.loads(envelope)
    type_name = data.get("type") if isinstance(data, dict) else None
    component = (
        event_component_name(type_name)
        if isinstance(type_name, str) and type_name in types.EVENT_TYPES
        else GENERIC
    )
    errors = sorted(_validator(component).iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    found = "; ".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(envelope)'}: {e.message[:200]}" for e in errors[:3]
    )
    return f"{type_name!r} does not match #/components/schemas/{component}: {found}\n  {envelope[:600]}"


def checked_encode(**kwargs: Any) -> str:
    envelope = _encode(**kwargs)
    found = problem(envelope)
    if found is not None:
        problems.append(found)
    return envelope


MARKER = "bad_envelopes"


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: the test makes envelopes its schema refuses on purpose (data stored before "
        "a rule existed); tests/envelopes.py does not fail it for them",
    )
    # ``encode`` is looked up in events_app.types (Frame.make) or imported by name
    # (events_app.services): replace it wherever it already is; later imports get this one.
    for module in list(sys.modules.values()):
        if getattr(module, "encode", None) is _encode:
            module.encode = checked_encode  # type: ignore[attr-defined]
    types.encode = checked_encode


def _check_phase(item: Any, when: str) -> Generator[None, None, None]:
    start = len(problems)
    result = yield
    new = problems[start:]
    if new and item.get_closest_marker(MARKER) is None:
        pytest.fail(
            f"{len(new)} envelope(s) encoded during {when} do not match the OpenAPI "
            "document:\n" + "\n".join(new),
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: Any) -> Generator[None, None, None]:
    return (yield from _check_phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: Any) -> Generator[None, None, None]:
    return (yield from _check_phase(item, "the test"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: Any, nextitem: Any) -> Generator[None, None, None]:
    return (yield from _check_phase(item, "teardown"))
