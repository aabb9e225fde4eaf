"""Shared assertions for the REST API tests."""
from __future__ import annotations

from typing import Any


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is a ``status`` error with exactly ``{"error": {"code", "message",
    "details"}}`` and the given code; returns the inner error for further checks."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    return error  # type: ignore[no-any-return]


def json_post(client: Any, path: str, data: Any, **extra: Any) -> Any:
    return client.post(path, data, format="json", **extra)


def raw(client: Any, method: str, path: str, body: bytes | str, content_type: str = "application/json", **extra: Any) -> Any:
    """Send ``body`` exactly as given (no encoding by the test client)."""
    data = body.encode() if isinstance(body, str) else body
    return client.generic(method, path, data, content_type=content_type, **extra)
