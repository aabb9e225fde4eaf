"""The OpenAPI description (``/api/schema/``, ``project/openapi.py``): valid OpenAPI 3,
complete (every URL under /api/, the two SSE streams, the error shape, every event type),
served publicly with browsable docs from local assets, and true: schemathesis against a
real daphne process finds no 5xx and no response that contradicts it."""
from __future__ import annotations

import copy
import json
import os
import re
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest
import yaml
from django.urls import URLPattern, URLResolver, get_resolver

from events_app.routing import sse_urlpatterns
from events_app.types import EVENT_TYPES
from project.openapi import TandemSchemaGenerator, event_component_name
from tests.conftest import token_for
from tests.envelopes import validator_for

HTML_PAGES = {"/api/docs/"}  # the browsable docs (Swagger UI): a page, not API
STREAM_PATHS = {"/api/sessions/{session_id}/stream/", "/api/stream/"}


def build_schema() -> dict[str, Any]:
    return TandemSchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return build_schema()


def _openapi_path(route: str) -> str:
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)


def api_routes() -> dict[str, Any]:
    """Every route under /api/ in the URLconf (but the catch-all 404): path -> callback."""
    found: dict[str, Any] = {}

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                route = prefix + str(pattern.pattern)
                if route.startswith("api/") and not route.endswith("^.*$"):
                    found[_openapi_path(route)] = pattern.callback

    walk(get_resolver().url_patterns, "")
    return found


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


# ---------------------------------------------------------------- the document


def test_the_schema_is_valid_openapi_3(schema: dict[str, Any]) -> None:
    from drf_spectacular.validation import validate_schema

    assert schema["openapi"].startswith("3.")
    validate_schema(schema)  # drf-spectacular's OpenAPI 3 meta-schema

    import schemathesis

    loaded = schemathesis.openapi.from_dict(copy.deepcopy(schema))
    results = list(loaded.get_all_operations())
    problems = [str(r.err()) for r in results if not hasattr(r, "ok")]
    assert problems == []
    assert len(results) == len(operations(schema))


def test_every_api_url_and_method_is_described(schema: dict[str, Any]) -> None:
    routes = api_routes()
    expected = set(routes) - HTML_PAGES
    assert expected <= set(schema["paths"]), sorted(expected - set(schema["paths"]))
    for path in expected:
        cls = routes[path].cls
        methods = {m.lower() for m in cls().allowed_methods} - {"options", "head"}
        assert methods == set(schema["paths"][path]), path
    for path in HTML_PAGES:
        assert path in routes and path not in schema["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(schema["paths"])  # outside /api/ too


def test_the_two_stream_endpoints_are_described(schema: dict[str, Any]) -> None:
    streams = {_openapi_path(str(p.pattern)) for p in sse_urlpatterns}
    assert streams == STREAM_PATHS
    for path in streams:
        op = schema["paths"][path]["get"]
        params = {p["name"] for p in op["parameters"]}
        assert {"types", "named", "last_event_id", "token", "ticket", "Last-Event-ID"} <= params
        assert ("session_id" in params) == ("{session_id}" in path)
        ok = op["responses"]["200"]["content"]["text/event-stream"]
        assert ok["schema"]["x-sse-data"] == {"$ref": "#/components/schemas/Event"}
        assert {"401", "400", "429"} <= set(op["responses"])
    schemes = schema["components"]["securitySchemes"]
    assert schemes["tokenQuery"] == {**schemes["tokenQuery"], "in": "query", "name": "token"}
    assert schemes["ticketQuery"] == {**schemes["ticketQuery"], "in": "query", "name": "ticket"}


def test_every_error_response_is_the_error_component(schema: dict[str, Any]) -> None:
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    for path, method, op in operations(schema):
        codes = {int(code) for code in op["responses"]}
        assert 500 in codes or not path.startswith("/api/"), (method, path)
        if op.get("security") and {} not in op["security"]:
            assert 401 in codes, (method, path)
        if "requestBody" in op:
            assert {400, 413, 415} <= codes, (method, path)
        if "{session_id}" in path:
            assert 404 in codes, (method, path)
        for code, response in op["responses"].items():
            if int(code) >= 400:
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                }, (method, path, code)
        if "429" in op["responses"]:
            assert "Retry-After" in op["responses"]["429"]["headers"]
        if "401" in op["responses"]:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]


def test_status_codes_the_contract_names(schema: dict[str, Any]) -> None:
    def codes(method: str, path: str) -> set[str]:
        return set(schema["paths"][path][method]["responses"])

    assert "202" in codes("post", "/api/sessions/{session_id}/messages/")
    assert "409" in codes("post", "/api/sessions/{session_id}/messages/")
    assert "201" in codes("post", "/api/sessions/")
    assert "204" in codes("delete", "/api/sessions/{session_id}/")
    assert "204" in codes("delete", "/api/sessions/{session_id}/members/{username}/")
    assert "201" in codes("post", "/api/sessions/{session_id}/events/")
    assert "409" in codes("post", "/api/sessions/{session_id}/permissions/{permission_id}/")
    assert "403" in codes("post", "/api/auth/register/")
    assert "429" in codes("post", "/api/sessions/{session_id}/events/")
    events = {p["name"] for p in schema["paths"]["/api/sessions/{session_id}/events/"]["get"]["parameters"]}
    assert events == {"session_id", "after", "limit", "types"}
    perms = schema["paths"]["/api/sessions/{session_id}/permissions/"]["get"]["parameters"]
    assert {p["name"] for p in perms} == {"session_id", "status"}
    for path in ("/api/sessions/", "/api/sessions/{session_id}/messages/"):
        assert {"cursor", "limit"} <= {p["name"] for p in schema["paths"][path]["get"]["parameters"]}
    security = schema["paths"]["/api/sessions/"]["get"]["security"]
    assert {"bearerAuth": []} in security and {"cookieAuth": []} in security
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_every_event_type_is_described(schema: dict[str, Any]) -> None:
    schemas = schema["components"]["schemas"]
    branches = [b["$ref"] for b in schemas["Event"]["oneOf"]]
    for name, definition in EVENT_TYPES.items():
        component = event_component_name(name)
        assert f"#/components/schemas/{component}" in branches
        event = schemas[component]
        assert event["properties"]["type"]["enum"] == [name]
        props = event["properties"]["properties"]
        assert set(props["properties"]) == definition.required | definition.optional
        assert props["properties"] == dict(definition.properties)  # the declared value schemas
        assert set(props.get("required", [])) == definition.required
        assert ("minimum" in event["properties"]["seq"]) == definition.persisted
    assert "#/components/schemas/CustomEvent" in branches
    page = schemas["EventPage"]["properties"]["events"]["items"]
    assert page == {"$ref": "#/components/schemas/Event"}
    ok = schema["paths"]["/api/sessions/{session_id}/events/"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/EventPage"}


def test_every_reference_names_a_component(schema: dict[str, Any]) -> None:
    # Views and event declarations name components ("Session", "Permission"...) that the
    # output serializers define: a renamed serializer must not leave a dangling $ref.
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert refs and refs <= set(schema["components"]["schemas"]), refs - set(schema["components"]["schemas"])


def test_each_envelope_matches_exactly_one_branch(schema: dict[str, Any]) -> None:
    event = validator_for(schema, "Event")
    user = {"id": 1, "username": "ada"}
    samples: list[dict[str, Any]] = [
        {"seq": None, "session_id": "ses_1", "type": "server.connected", "time": "2025-01-01T00:00:00Z",
         "properties": {"connection_id": "con_1", "last_seq": 3, "resumed": False}},
        {"seq": None, "session_id": None, "type": "server.heartbeat", "time": "2025-01-01T00:00:00Z",
         "properties": {}},
        {"seq": 4, "session_id": "ses_1", "type": "member.added", "time": "2025-01-01T00:00:00Z",
         "properties": {"user": user, "role": "editor"}},
        {"seq": 5, "session_id": "ses_1", "type": "task.progress", "time": "2025-01-01T00:00:00Z",
         "properties": {"pct": 40, "published_by": user}, "cursor": "abc"},
    ]
    for sample in samples:
        event.validate(sample)
    wrong = [
        {**samples[2], "seq": None},  # persisted events have a seq
        {**samples[2], "properties": {"user": user}},  # a required property is missing
        {**samples[2], "properties": {"user": user, "role": "editor", "extra": 1}},  # undeclared
        {**samples[3], "type": "session.other"},  # a reserved prefix
        {**samples[3], "properties": {"pct": 40}},  # custom events carry published_by
    ]
    for sample in wrong:
        assert not event.is_valid(sample), sample


# ---------------------------------------------------------------- served


@pytest.mark.django_db
def test_the_schema_is_served_publicly_as_yaml_or_json(client: Any) -> None:
    as_yaml = client.get("/api/schema/")
    assert as_yaml.status_code == 200
    assert as_yaml["Content-Type"].startswith("application/vnd.oai.openapi")
    assert yaml.safe_load(as_yaml.content)["openapi"].startswith("3.")
    for response in (
        client.get("/api/schema/?format=json"),
        client.get("/api/schema/", HTTP_ACCEPT="application/json"),
        # public: credentials are neither needed nor checked
        client.get("/api/schema/?format=json", HTTP_AUTHORIZATION="Basic Zm9vOmJhcg=="),
    ):
        assert response.status_code == 200
        assert "json" in response["Content-Type"]
        assert set(json.loads(response.content)["paths"]) >= STREAM_PATHS


@pytest.mark.django_db
@pytest.mark.parametrize("path", sorted(HTML_PAGES))
def test_the_docs_pages_use_local_assets(client: Any, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "/static/drf_spectacular_sidecar/" in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page loads nothing from elsewhere"
    assert "/api/schema/" in page


# ---------------------------------------------------------------- schemathesis, live

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = int(os.environ.get("OPENAPI_MAX_EXAMPLES", "15"))
BUDGET_SECONDS = float(os.environ.get("OPENAPI_BUDGET_SECONDS", "75"))
MODES = os.environ.get("OPENAPI_MODES", "positive,negative").split(",")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    servers: Any, shared_session: Any, alice: Any, tmp_path: Any
) -> None:
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis.configuration import set_hypothesis_home_dir
    from schemathesis import GenerationMode
    from schemathesis import checks as st_checks
    from schemathesis.specs.openapi import checks as openapi_checks

    set_hypothesis_home_dir(tmp_path / "hypothesis")  # its caches stay out of the checkout
    (server,) = servers(1)
    # schemathesis leaves out the operation that served the document unless asked.
    loaded: Any = schemathesis.openapi.from_url(f"{server.url}/api/schema/?format=json", timeout=30)
    loaded = loaded.include(path_regex=r"^/")
    check_functions = [
        getattr(st_checks, name, None) or getattr(openapi_checks, name) for name in CHECKS
    ]
    headers = {"Authorization": f"Bearer {token_for(alice)}"}
    http = requests.Session()

    ops: list[Any] = [result.ok() for result in loaded.get_all_operations()]
    # Streams never end; deleting the shared session goes last so the rest has one.
    runnable = [op for op in ops if not op.path.endswith("stream/")]
    last = [op for op in runnable if op.method.upper() == "DELETE" and op.path == "/api/sessions/{session_id}/"]
    runnable = [op for op in runnable if op not in last] + last
    assert {op.path for op in ops} - {op.path for op in runnable} == STREAM_PATHS

    modes = [GenerationMode(m) for m in MODES]
    def negatable(op: Any) -> bool:  # something to make invalid: parameters or a body
        raw = op.definition.raw
        return bool(raw.get("parameters") or raw.get("requestBody"))

    plan = [
        (mode, op)
        for mode in modes
        for op in runnable
        if op not in last and (mode == GenerationMode.POSITIVE or negatable(op))
    ]
    plan += [(GenerationMode.POSITIVE, op) for op in last]
    failures: list[str] = []
    ran: dict[str, int] = {}
    statuses: dict[str, Counter[int]] = {}
    started = time.monotonic()
    per_op_budget = BUDGET_SECONDS / len(plan)
    for mode, op in plan:
        label = f"{mode.value:8s} {op.method.upper()} {op.path}"
        fixed = {"session_id": shared_session.id} if "{session_id}" in op.path else {}
        count = 0
        seen = statuses.setdefault(label, Counter())
        op_started = time.monotonic()

        @hypothesis.settings(
            max_examples=1 if op in last else MAX_EXAMPLES,
            deadline=timedelta(seconds=10),
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @hypothesis.given(case=op.as_strategy(mode, path_parameters=fixed))
        def run(case: Any) -> None:
            nonlocal count
            if time.monotonic() - op_started > per_op_budget * 2 and count >= 3:
                return  # bounded in time as well as in examples
            count += 1
            response = case.call_and_validate(
                base_url=server.url, session=http, headers=headers, checks=check_functions, timeout=10
            )
            seen[response.status_code] += 1

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # collect all, then fail once with every finding
            failures.append(f"{label}:\n{exc}")
        ran[label] = count
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {len(plan)} runs, {sum(ran.values())} requests, {elapsed:.1f}s")
    for label, count in ran.items():
        codes = " ".join(f"{code}x{n}" for code, n in sorted(statuses[label].items()))
        print(f"  {count:3d}  {label:70s} {codes}")
    assert not failures, "\n\n".join(failures) + "\n\nserver log:\n" + server.log()[-4000:]
    assert all(count >= 1 for count in ran.values()), ran


@pytest.mark.slow
def test_a_live_stream_and_its_docs_match_the_description(servers: Any, shared_session: Any, alice: Any) -> None:
    (server,) = servers(1)
    schema = httpx.get(f"{server.url}/api/schema/?format=json", timeout=30).json()
    event = validator_for(schema, "Event")
    token = token_for(alice)

    # The docs page's own assets come from this server (drf-spectacular-sidecar).
    page = httpx.get(f"{server.url}/api/docs/", timeout=10).text
    for asset in re.findall(r'"(/static/drf_spectacular_sidecar/[^"]+)"', page):
        assert httpx.get(f"{server.url}{asset}", timeout=10).status_code == 200, asset

    # An SSE stream: its frames carry Event envelopes.
    httpx.post(
        f"{server.url}/api/sessions/{shared_session.id}/events/",
        json={"type": "task.progress", "properties": {"pct": 40}},
        headers={"Authorization": f"Bearer {token}"}, timeout=10,
    ).raise_for_status()
    seen: list[dict[str, Any]] = []
    url = f"{server.url}/api/sessions/{shared_session.id}/stream/?last_event_id=0&ticket="
    ticket = httpx.post(
        f"{server.url}/api/auth/ticket/", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()["ticket"]
    with httpx.stream("GET", url + ticket, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1]["type"] == "task.progress":
                    break
    assert [e["type"] for e in seen][:2] == ["server.connected", "session.created"]
    for envelope in seen:
        errors = [e.message for e in event.iter_errors(envelope)]
        assert not errors, (envelope, errors)

    # An error before the stream starts is in the error shape the description promises.
    bad = httpx.get(f"{server.url}/api/sessions/{shared_session.id}/stream/?last_event_id=x&token={token}", timeout=10)
    assert bad.status_code == 400
    validator_for(schema, "Error").validate(bad.json())
