"""The server side of the browser pages: who may open them, and where the others go."""
from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from sessions_app.models import Session
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def browser_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("path", ["/", "/s/ses_whatever/"])
def test_anonymous_visitors_go_to_the_login_page_and_back(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_login_returns_to_the_page_asked_for(alice: Any, shared_session: Session) -> None:
    browser = Client()
    target = f"/s/{shared_session.id}/"
    response = browser.post("/accounts/login/", {"username": "alice", "password": PASSWORD, "next": target})
    assert response.status_code == 302 and response["Location"] == target
    page = browser.get(target)
    assert page.status_code == 200
    assert f'data-session-id="{shared_session.id}"' in page.content.decode()


def test_member_opens_the_session_page_with_their_role(shared_session: Session, carol: Any) -> None:
    page = browser_for(carol).get(f"/s/{shared_session.id}/").content.decode()
    assert 'data-role="viewer"' in page


@pytest.mark.parametrize("session_id", ["ses_doesnotexist", "shared"])
def test_outsiders_and_unknown_sessions_get_a_404_page(
    shared_session: Session, charlie: Any, session_id: str
) -> None:
    sid = shared_session.id if session_id == "shared" else session_id
    response = browser_for(charlie).get(f"/s/{sid}/")
    assert response.status_code == 404
    body = response.content.decode()
    assert "Not found" in body and "<html" in body and shared_session.title not in body


def test_unknown_pages_get_the_404_page(alice: Any, settings: Any) -> None:
    settings.DEBUG = False
    response = browser_for(alice).get("/no/such/page/")
    assert response.status_code == 404 and "Not found" in response.content.decode()


def test_signup_creates_the_account_logs_in_and_returns(shared_session: Session) -> None:
    browser = Client()
    assert browser.get("/accounts/signup/").status_code == 200
    response = browser.post(
        "/accounts/signup/",
        {"username": "dora", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72", "next": "/"},
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert browser.get("/").status_code == 200


@pytest.mark.parametrize(
    "form, field",
    [
        ({"username": "", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72"}, "username"),
        ({"username": "alice", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72"}, "username"),
        ({"username": "has space", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72"}, "username"),
        ({"username": "dora", "password1": "plum-orbit-lantern-72", "password2": "different-72-words"}, "password2"),
        ({"username": "dora", "password1": "123", "password2": "123"}, "password2"),
    ],
)
def test_bad_signups_show_the_form_with_the_error(alice: Any, form: dict[str, str], field: str) -> None:
    response = Client().post("/accounts/signup/", form)
    assert response.status_code == 200
    assert response.context["form"].errors.get(field), response.context["form"].errors
    assert 'role="alert"' in response.content.decode()


def test_signup_refuses_to_redirect_elsewhere() -> None:
    response = Client().post(
        "/accounts/signup/",
        {"username": "dora", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72",
         "next": "https://evil.example/"},
    )
    assert response["Location"] == "/"


def test_signup_closed(settings: Any) -> None:
    settings.TANDEM_ALLOW_SIGNUP = False
    response = Client().get("/accounts/signup/")
    assert response.status_code == 403 and "closed" in response.content.decode()


def test_logout_is_a_post_and_ends_the_login(alice: Any) -> None:
    browser = browser_for(alice)
    response = browser.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert browser.get("/").status_code == 302


def test_static_files_are_served_by_the_app() -> None:
    response = Client().get("/static/css/tandem.css")
    assert response.status_code == 200
