"""§3 events over REST: history with after/limit/types and resets, and publishing custom
events with every way a publish can be refused."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from events_app.models import Event
from sessions_app.models import Session
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db


def events_url(session: Any, query: str = "") -> str:
    return f"/api/sessions/{session.id}/events/" + (f"?{query}" if query else "")


def publish(client: Any, session: Any, type_name: str, properties: Any = None) -> Any:
    body: dict[str, Any] = {"type": type_name}
    if properties is not None:
        body["properties"] = properties
    return client.post(events_url(session), body, format="json")


def head(session: Any) -> int:
    return int(Session.objects.values_list("last_seq", flat=True).get(pk=session.pk))


# ---------------------------------------------------------------- history


def test_history_returns_every_event_from_the_start(shared_session: Any, carol: Any, api: Any) -> None:
    response = api(carol).get(events_url(shared_session))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"events", "last_seq", "reset"}
    assert body["reset"] is False and body["last_seq"] == 3
    assert [(e["seq"], e["type"]) for e in body["events"]] == [
        (1, "session.created"), (2, "member.added"), (3, "member.added"),
    ]
    for event in body["events"]:
        assert set(event) == {"seq", "session_id", "type", "time", "properties"}
        assert event["session_id"] == shared_session.id and event["time"].endswith("Z")


def test_history_after_skips_what_the_client_has(shared_session: Any, carol: Any, api: Any) -> None:
    body = api(carol).get(events_url(shared_session, "after=1")).json()
    assert [e["seq"] for e in body["events"]] == [2, 3] and body["reset"] is False


def test_history_after_the_head_is_empty_without_reset(shared_session: Any, carol: Any, api: Any) -> None:
    body = api(carol).get(events_url(shared_session, "after=3")).json()
    assert body == {"events": [], "last_seq": 3, "reset": False}


def test_history_limit_caps_the_page(shared_session: Any, bob: Any, api: Any) -> None:
    for i in range(5):
        assert publish(api(bob), shared_session, "task.progress", {"i": i}).status_code == 201
    body = api(bob).get(events_url(shared_session, "after=2&limit=2")).json()
    assert [e["seq"] for e in body["events"]] == [3, 4]
    assert body["last_seq"] == 8 and body["reset"] is False


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_history_limit_bounds_are_accepted(shared_session: Any, carol: Any, api: Any, limit: str) -> None:
    body = api(carol).get(events_url(shared_session, f"limit={limit}")).json()
    assert len(body["events"]) == min(int(limit), 3)


def test_history_types_filters_exact_and_prefix(shared_session: Any, bob: Any, api: Any) -> None:
    publish(api(bob), shared_session, "task.progress", {"pct": 10})
    publish(api(bob), shared_session, "task.step.done", {})
    publish(api(bob), shared_session, "build.finished", {})
    client = api(bob)
    exact = client.get(events_url(shared_session, "types=member.added")).json()["events"]
    assert [e["seq"] for e in exact] == [2, 3]
    prefix = client.get(events_url(shared_session, "types=task.*")).json()["events"]
    assert [e["type"] for e in prefix] == ["task.progress", "task.step.done"]
    both = client.get(events_url(shared_session, "types=session.created,build.*")).json()["events"]
    assert [e["type"] for e in both] == ["session.created", "build.finished"]


def test_history_types_and_limit_combine(shared_session: Any, bob: Any, api: Any) -> None:
    for i in range(3):
        publish(api(bob), shared_session, "task.progress", {"i": i})
    body = api(bob).get(events_url(shared_session, "types=task.*&limit=2&after=4")).json()
    assert [e["properties"]["i"] for e in body["events"]] == [1, 2]


@pytest.mark.parametrize("query, param", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"),
    ("limit=1.5", "limit"), ("after=abc", "after"), ("after=-1", "after"), ("after=1e3", "after"),
    ("after=%EF%BC%91", "after"), ("after=+1", "after"), ("after=%201", "after"),
    ("limit=99999999999999999999999", "limit"),
])
def test_history_bad_numbers_are_400(shared_session: Any, carol: Any, api: Any, query: str, param: str) -> None:
    error = assert_error(api(carol).get(events_url(shared_session, query)), 400, "bad_request")
    assert param in error["message"] or param in error["details"]


@pytest.mark.parametrize("after", ["9223372036854775808", "99999999999999999999999", "9" * 5000])
def test_history_after_any_position_beyond_the_head_is_a_reset(
    shared_session: Any, carol: Any, api: Any, after: str
) -> None:
    # Well-formed however large: beyond the head, like after=head+1, never a 400.
    response = api(carol).get(events_url(shared_session, f"after={after}"))
    assert response.status_code == 200, response.content[:300]
    assert response.json() == {"events": [], "last_seq": shared_session.last_seq, "reset": True}


@pytest.mark.parametrize("types", ["*", "Task.progress", "task..x", "task.*.x", "a" * 70, "task progress", "%00"])
def test_history_bad_types_are_400(shared_session: Any, carol: Any, api: Any, types: str) -> None:
    assert_error(api(carol).get(events_url(shared_session, f"types={types}")), 400, "bad_request")


def test_history_unknown_parameter_is_400(shared_session: Any, carol: Any, api: Any) -> None:
    assert_error(api(carol).get(events_url(shared_session, "since=1")), 400, "bad_request")


def test_history_beyond_the_head_resets_with_no_events(shared_session: Any, carol: Any, api: Any) -> None:
    body = api(carol).get(events_url(shared_session, "after=4")).json()
    assert body == {"events": [], "last_seq": 3, "reset": True}


def test_history_after_pruning_resets(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_EVENT_RETENTION_COUNT = 3
    for i in range(5):
        assert publish(api(bob), shared_session, "task.progress", {"i": i}).status_code == 201
    assert head(shared_session) == 8
    assert sorted(Event.objects.filter(session=shared_session).values_list("seq", flat=True)) == [6, 7, 8]
    client = api(bob)
    assert client.get(events_url(shared_session)).json() == {"events": [], "last_seq": 8, "reset": True}
    assert client.get(events_url(shared_session, "after=4")).json()["reset"] is True
    kept = client.get(events_url(shared_session, "after=5")).json()
    assert kept["reset"] is False and [e["seq"] for e in kept["events"]] == [6, 7, 8]


def test_outsider_cannot_read_history(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).get(events_url(shared_session)), 404, "not_found")


# ---------------------------------------------------------------- publishing


def test_editor_publishes_a_custom_event(shared_session: Any, bob: Any, api: Any) -> None:
    response = publish(api(bob), shared_session, "task.progress", {"pct": 40, "note": "h\u00e9"})
    assert response.status_code == 201, response.content
    event = response.json()
    assert event["seq"] == 4 and event["type"] == "task.progress"
    assert event["session_id"] == shared_session.id
    assert event["properties"] == {"pct": 40, "note": "h\u00e9", "published_by": {"id": bob.pk, "username": "bob"}}
    stored = Event.objects.get(session=shared_session, seq=4)
    assert orjson.loads(stored.envelope) == event
    assert head(shared_session) == 4


def test_owner_publishes_without_properties(shared_session: Any, alice: Any, api: Any) -> None:
    event = publish(api(alice), shared_session, "build.started").json()
    assert event["properties"] == {"published_by": {"id": alice.pk, "username": "alice"}}


def test_published_event_appears_in_history(shared_session: Any, bob: Any, carol: Any, api: Any) -> None:
    publish(api(bob), shared_session, "task.progress", {"pct": 1})
    events = api(carol).get(events_url(shared_session, "after=3")).json()["events"]
    assert [e["type"] for e in events] == ["task.progress"]


def test_type_of_exactly_64_characters_is_accepted(shared_session: Any, bob: Any, api: Any) -> None:
    name = "t." + "a" * 62
    assert len(name) == 64
    assert publish(api(bob), shared_session, name, {}).status_code == 201


def test_viewer_cannot_publish(shared_session: Any, carol: Any, api: Any) -> None:
    assert_error(publish(api(carol), shared_session, "task.progress", {}), 403, "permission_denied")
    assert head(shared_session) == 3


def test_outsider_cannot_publish(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(publish(api(charlie), shared_session, "task.progress", {}), 404, "not_found")
    assert head(shared_session) == 3


@pytest.mark.parametrize("prefix", ["server", "stream", "session", "message", "permission", "presence", "auth", "member"])
def test_reserved_prefixes_are_refused(shared_session: Any, bob: Any, api: Any, prefix: str) -> None:
    error = assert_error(publish(api(bob), shared_session, f"{prefix}.x", {}), 400, "validation_error")
    assert "type" in error["details"]
    assert head(shared_session) == 3


@pytest.mark.parametrize("properties", [{}, {"message_id": "m", "call_id": "c", "tool": "t", "status": "running"}])
def test_built_in_types_outside_reserved_prefixes_are_refused(
    shared_session: Any, bob: Any, api: Any, properties: dict[str, Any]
) -> None:
    # tool.status is a built-in type but not under a reserved prefix: a 400, not a 500.
    error = assert_error(publish(api(bob), shared_session, "tool.status", properties), 400, "validation_error")
    assert "built-in" in error["details"]["type"][0]
    assert head(shared_session) == 3


@pytest.mark.parametrize(
    "type_name",
    ["task", "Task.progress", "task.", ".task", "task..x", "1task.x", "task.pro-gress", "task.progress ", "t\u00e4sk.x",
     "task.*", "", "t." + "a" * 63, "t." + "a" * 300],
)
def test_bad_type_names_are_refused(shared_session: Any, bob: Any, api: Any, type_name: str) -> None:
    error = assert_error(publish(api(bob), shared_session, type_name, {}), 400, "validation_error")
    assert "type" in error["details"]
    assert head(shared_session) == 3


@pytest.mark.parametrize("type_value", [None, 5, ["task.progress"], {"a": 1}, True])
def test_type_must_be_a_string(shared_session: Any, bob: Any, api: Any, type_value: Any) -> None:
    response = api(bob).post(events_url(shared_session), {"type": type_value, "properties": {}}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "type" in error["details"]


@pytest.mark.parametrize("properties", [[1, 2], "text", 5, None, True])
def test_properties_must_be_an_object(shared_session: Any, bob: Any, api: Any, properties: Any) -> None:
    response = api(bob).post(events_url(shared_session), {"type": "task.progress", "properties": properties}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "properties" in error["details"]
    assert head(shared_session) == 3


def test_properties_cannot_claim_published_by(shared_session: Any, bob: Any, api: Any) -> None:
    response = publish(api(bob), shared_session, "task.progress", {"published_by": {"id": 1, "username": "alice"}})
    error = assert_error(response, 400, "validation_error")
    assert "properties" in error["details"]


def test_missing_type_and_unknown_fields_are_named(shared_session: Any, bob: Any, api: Any) -> None:
    error = assert_error(api(bob).post(events_url(shared_session), {"properties": {}}, format="json"), 400, "validation_error")
    assert "type" in error["details"]
    error = assert_error(
        api(bob).post(events_url(shared_session), {"type": "task.x", "seq": 9}, format="json"), 400, "validation_error"
    )
    assert "seq" in error["details"]


def test_body_over_the_event_limit_is_413(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_EVENT_BYTES = 300
    response = publish(api(bob), shared_session, "task.progress", {"blob": "x" * 400})
    assert_error(response, 413, "payload_too_large")
    assert head(shared_session) == 3


def test_body_counts_bytes_not_characters(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_EVENT_BYTES = 300
    # 150 characters, 600 bytes of UTF-8: over the limit.
    response = api(bob).generic(
        "POST", events_url(shared_session),
        orjson.dumps({"type": "task.progress", "properties": {"s": "\U0001f600" * 150}}),
        content_type="application/json",
    )
    assert_error(response, 413, "payload_too_large")
    assert head(shared_session) == 3


def test_body_just_under_the_event_limit_is_accepted(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_EVENT_BYTES = 300
    assert publish(api(bob), shared_session, "task.progress", {"blob": "x" * 200}).status_code == 201


def test_oversized_event_is_413_even_when_it_is_also_invalid(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_EVENT_BYTES = 300
    response = publish(api(bob), shared_session, "session.fake", {"blob": "x" * 400})
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30])
def test_integers_json_cannot_carry_are_400_not_500(shared_session: Any, bob: Any, api: Any, value: int) -> None:
    raw = b'{"type": "task.progress", "properties": {"n": %d}}' % value
    response = api(bob).generic("POST", events_url(shared_session), raw, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert head(shared_session) == 3


def test_lone_surrogate_in_properties_is_400_not_500(shared_session: Any, bob: Any, api: Any) -> None:
    raw = b'{"type": "task.progress", "properties": {"s": "\\ud800"}}'
    response = api(bob).generic("POST", events_url(shared_session), raw, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert head(shared_session) == 3


def test_deeply_nested_properties_are_400_not_500(shared_session: Any, bob: Any, api: Any) -> None:
    depth = 1000
    raw = b'{"type": "task.progress", "properties": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    response = api(bob).generic("POST", events_url(shared_session), raw, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert head(shared_session) == 3


def test_moderately_nested_properties_are_stored_intact(shared_session: Any, bob: Any, api: Any) -> None:
    nested: Any = "leaf"
    for _ in range(50):
        nested = {"k": [nested]}
    response = publish(api(bob), shared_session, "task.tree", {"tree": nested})
    assert response.status_code == 201, response.content
    stored = orjson.loads(Event.objects.get(session=shared_session, seq=4).envelope)
    assert stored["properties"]["tree"] == nested
