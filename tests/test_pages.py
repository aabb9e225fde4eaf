"""The server side of the browser pages: who may open them, and where the others go."""
from __future__ import annotations

import smtplib
from collections.abc import Sequence
from typing import Any

import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.test import Client

from sessions_app.models import Session
from tests.conftest import PASSWORD, free_port

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


# ---------------------------------------------------------------- issue 14, defects 5 and 6


@pytest.mark.parametrize("path", ["/no/such/page/", "/accounts/nope/", "/s/", "/static/nope.css", "/favicon.ico"])
def test_unknown_pages_are_the_tandem_404_even_with_debug_on(alice: Any, settings: Any, path: str) -> None:
    settings.DEBUG = True  # the quick start's setting: Django's technical 404 lists the URL patterns
    response = browser_for(alice).get(path)
    assert response.status_code == 404
    body = response.content.decode()
    assert "There is nothing here" in body and "tandem.css" in body
    assert "URLconf" not in body and "api/" not in body and "accounts/signup/" not in body


def test_anonymous_unknown_pages_are_the_tandem_404_with_debug_on(settings: Any) -> None:
    settings.DEBUG = True
    response = Client().get("/nothing-here/")
    assert response.status_code == 404 and "There is nothing here" in response.content.decode()


def test_api_404s_keep_the_json_error_shape_with_debug_on(alice: Any, settings: Any) -> None:
    settings.DEBUG = True
    response = browser_for(alice).get("/api/no/such/thing/")
    assert response.status_code == 404 and response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_found"


def test_a_missing_slash_still_redirects(alice: Any, settings: Any) -> None:
    settings.DEBUG = True
    response = browser_for(alice).get("/accounts/login")
    assert response.status_code == 301 and response["Location"] == "/accounts/login/"


def test_logout_by_get_shows_a_confirmation_and_logs_nobody_out(alice: Any) -> None:
    browser = browser_for(alice)
    response = browser.get("/accounts/logout/")
    body = response.content.decode()
    assert response.status_code == 200
    assert 'method="post" action="/accounts/logout/"' in body and "csrfmiddlewaretoken" in body
    assert browser.get("/").status_code == 200  # still signed in: a GET changes nothing
    assert browser.post("/accounts/logout/").status_code == 302
    assert browser.get("/").status_code == 302


def test_logout_by_get_when_signed_out_says_so() -> None:
    response = Client().get("/accounts/logout/")
    assert response.status_code == 200 and "You are logged out" in response.content.decode()


def test_a_signed_in_user_is_sent_away_from_sign_up(alice: Any, settings: Any) -> None:
    settings.TANDEM_ALLOW_SIGNUP = True
    browser = browser_for(alice)
    response = browser.get("/accounts/signup/")
    assert response.status_code == 302 and response["Location"] == "/"
    response = browser.post("/accounts/signup/", {"username": "newbie", "password1": "x", "password2": "x"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert not type(alice).objects.filter(username="newbie").exists()
    assert browser.get("/accounts/signup/?next=/s/ses_x/")["Location"] == "/s/ses_x/"
    assert browser.get("/accounts/signup/?next=https://evil.example/")["Location"] == "/"


@pytest.mark.parametrize("path,heading", [
    ("/accounts/password_change/", "Change your password"),
    ("/accounts/password_reset/", "Forgot your password?"),
    ("/accounts/password_reset/done/", "Check your email"),
    ("/accounts/reset/MQ/bad-token/", "This link does not work"),
    ("/accounts/reset/done/", "Your new password is set"),
])
def test_password_pages_are_tandem_pages(alice: Any, path: str, heading: str) -> None:
    response = browser_for(alice).get(path)
    assert response.status_code == 200
    body = response.content.decode()
    assert heading in body and "css/tandem.css" in body
    assert "Django administration" not in body and "admin/css" not in body


def test_a_password_change_through_the_page_works(alice: Any) -> None:
    browser = browser_for(alice)
    new = "quiet-harbour-lantern-93"
    response = browser.post("/accounts/password_change/", {
        "old_password": PASSWORD, "new_password1": new, "new_password2": new,
    })
    assert response.status_code == 302 and response["Location"] == "/accounts/password_change/done/"
    assert "Your password was changed" in browser.get(response["Location"]).content.decode()
    alice.refresh_from_db()
    assert alice.check_password(new)


def test_password_pages_are_linked(alice: Any) -> None:
    assert 'href="/accounts/password_reset/"' in Client().get("/accounts/login/").content.decode()
    assert 'href="/accounts/password_change/"' in browser_for(alice).get("/").content.decode()


def test_every_page_links_a_favicon_that_is_served(alice: Any) -> None:
    for page in (Client().get("/accounts/login/"), browser_for(alice).get("/")):
        assert '<link rel="icon" href="/static/img/favicon.svg"' in page.content.decode()
    icon = Client().get("/static/img/favicon.svg")
    assert icon.status_code == 200 and b"<svg" in b"".join(icon.streaming_content)  # type: ignore[attr-defined]


def test_an_untitled_session_is_not_named_by_its_id(alice: Any) -> None:
    from sessions_app import services

    session = services.create_session(alice, title="", agent="echo")
    body = browser_for(alice).get(f"/s/{session.id}/").content.decode()
    assert "<title>Untitled session · Tandem</title>" in body
    assert '<h1 id="session-title">Untitled session</h1>' in body
    assert f">{session.id}<" not in body


class RefusingMailBackend(BaseEmailBackend):
    """A mail server that is down: every connection is refused."""

    def open(self) -> bool:
        raise ConnectionRefusedError(111, "Connection refused")

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        self.open()
        return 0


class BouncingMailBackend(BaseEmailBackend):
    """A mail server that takes the connection and then refuses the message."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        raise smtplib.SMTPDataError(451, b"Try again later")


@pytest.fixture
def alice_with_email(alice: Any) -> Any:
    """An account the administrator made with an email address (sign-up makes none)."""
    alice.email = "alice@example.test"
    alice.save(update_fields=["email"])
    return alice


def test_a_reset_for_an_account_with_email_sends_a_tandem_link(alice_with_email: Any) -> None:
    response = Client().post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert response.status_code == 302 and response["Location"] == "/accounts/password_reset/done/"
    [message] = mail.outbox
    assert message.to == ["alice@example.test"] and "Tandem" in message.subject
    assert "alice" in message.body and "http://testserver/accounts/reset/" in message.body
    link = next(word for word in message.body.split() if "/accounts/reset/" in word)
    # The link works: it leads to the form for a new password.
    browser = Client()
    form = browser.get(link, follow=True)
    assert form.status_code == 200 and "new_password1" in form.content.decode()


def test_no_mail_server_gives_a_clear_page_not_a_false_check_your_email(
    alice_with_email: Any, settings: Any
) -> None:
    # Django's default: SMTP on this machine, where nothing listens.
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", free_port(), 5
    response = Client().post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert response.status_code == 503
    body = response.content.decode()
    assert "could not send" in body and "css/tandem.css" in body and "Check your email" not in body


@pytest.mark.parametrize("email", ["alice@example.test", "nobody@example.test"])
def test_a_mail_server_that_is_down_gives_the_same_clear_page_for_any_address(
    alice_with_email: Any, settings: Any, email: str
) -> None:
    # The same answer whether or not an account has the address: the page must not tell
    # strangers which addresses have accounts.
    settings.EMAIL_BACKEND = "tests.test_pages.RefusingMailBackend"
    response = Client().post("/accounts/password_reset/", {"email": email})
    assert response.status_code == 503 and "could not send" in response.content.decode()


def test_a_refused_message_gives_the_clear_page_too(alice_with_email: Any, settings: Any) -> None:
    settings.EMAIL_BACKEND = "tests.test_pages.BouncingMailBackend"
    response = Client().post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert response.status_code == 503 and "could not send" in response.content.decode()


def test_with_email_off_the_reset_page_says_so_and_sends_nothing(
    alice_with_email: Any, settings: Any
) -> None:
    settings.TANDEM_EMAIL_BACKEND = "none"
    page = Client().get("/accounts/password_reset/")
    assert page.status_code == 200
    assert "not set up to send email" in page.content.decode() and 'name="email"' not in page.content.decode()
    response = Client().post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert response.status_code == 200 and "not set up to send email" in response.content.decode()
    assert mail.outbox == []


def test_a_bad_reset_form_is_a_form_error_not_a_mail_attempt(alice_with_email: Any, settings: Any) -> None:
    settings.EMAIL_BACKEND = "tests.test_pages.RefusingMailBackend"
    response = Client().post("/accounts/password_reset/", {"email": "not an address"})
    assert response.status_code == 200 and "Enter a valid email address" in response.content.decode()


def test_the_reset_page_is_throttled_per_address(alice_with_email: Any, settings: Any) -> None:
    from tests.test_auth_throttle import fresh_window

    settings.TANDEM_RATE_AUTH_IP = "2/hour"
    fresh_window()
    browser = Client(REMOTE_ADDR="203.0.113.81")
    for _ in range(2):
        assert browser.post("/accounts/password_reset/", {"email": "alice@example.test"}).status_code == 302
    refused = browser.post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
    assert len(mail.outbox) == 2
    assert browser.get("/accounts/password_reset/").status_code == 200  # the form itself still shows


def test_a_password_change_signs_out_the_accounts_other_browsers(alice: Any) -> None:
    here, elsewhere = Client(), Client()
    for browser in (here, elsewhere):
        assert browser.post("/accounts/login/", {"username": "alice", "password": PASSWORD}).status_code == 302
    new = "quiet-harbour-lantern-93"
    here.post("/accounts/password_change/", {"old_password": PASSWORD, "new_password1": new, "new_password2": new})
    assert here.get("/").status_code == 200
    assert elsewhere.get("/")["Location"] == "/accounts/login/?next=/"


def test_on_the_quick_start_the_reset_link_shows_in_the_servers_output(
    alice_with_email: Any, settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
    response = Client().post("/accounts/password_reset/", {"email": "alice@example.test"})
    assert response.status_code == 302
    assert "http://testserver/accounts/reset/" in capsys.readouterr().out


def test_the_sidebars_new_session_link_lands_on_the_form(alice: Any, shared_session: Session) -> None:
    browser = browser_for(alice)
    assert 'href="/#new-title">+ New session</a>' in browser.get(f"/s/{shared_session.id}/").content.decode()
    assert '<input id="new-title"' in browser.get("/").content.decode()
