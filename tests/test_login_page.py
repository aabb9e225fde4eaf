from __future__ import annotations

from typing import Any

from django.test import Client

from tests.conftest import PASSWORD


def test_person_logs_in_with_the_form_and_then_uses_the_api_by_cookie(alice: Any) -> None:
    browser = Client(enforce_csrf_checks=True)
    page = browser.get("/accounts/login/")
    assert page.status_code == 200 and b'name="username"' in page.content
    csrf = page.cookies["csrftoken"].value
    logged_in = browser.post(
        "/accounts/login/", {"username": "alice", "password": PASSWORD, "csrfmiddlewaretoken": csrf}
    )
    assert logged_in.status_code == 302
    assert browser.get("/api/sessions/").status_code == 200
    without_csrf = browser.post("/api/sessions/", {"title": "x"}, content_type="application/json")
    assert without_csrf.status_code == 403
    rotated = browser.cookies["csrftoken"].value  # login rotates the token
    with_csrf = browser.post(
        "/api/sessions/", {"title": "x"}, content_type="application/json", HTTP_X_CSRFTOKEN=rotated
    )
    assert with_csrf.status_code == 201


def test_wrong_password_shows_the_form_again(alice: Any) -> None:
    response = Client().post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200 and b"didn't match" in response.content
