from __future__ import annotations

from typing import Any


def test_owner_creates_and_reads_a_session(alice: Any, api: Any) -> None:
    created = api(alice).post("/api/sessions/", {"title": "Fix it"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["role"] == "owner" and body["agent"] == "echo" and body["status"] == {"type": "idle"}
    assert body["last_seq"] == 1  # session.created
    fetched = api(alice).get(f"/api/sessions/{body['id']}/")
    assert fetched.json()["id"] == body["id"]


def test_outsider_gets_404(shared_session: Any, charlie: Any, api: Any) -> None:
    response = api(charlie).get(f"/api/sessions/{shared_session.id}/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
