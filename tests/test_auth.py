"""§1 authentication over REST: register, tokens, tickets, and every way a credential can
be wrong."""
from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from project.auth import read_ticket
from tests.conftest import PASSWORD, token_for
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

STRONG = "plum-orbit-lantern-72"


def anon() -> APIClient:
    return APIClient()


# ---------------------------------------------------------------- register


def test_register_creates_a_user_and_returns_id_and_username() -> None:
    response = anon().post("/api/auth/register/", {"username": "dora", "password": STRONG}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    user = get_user_model().objects.get(username="dora")
    assert body == {"id": user.pk, "username": "dora"}
    assert user.check_password(STRONG)


def test_registered_user_can_obtain_a_token() -> None:
    anon().post("/api/auth/register/", {"username": "dora", "password": STRONG}, format="json")
    response = anon().post("/api/auth/token/", {"username": "dora", "password": STRONG}, format="json")
    assert response.status_code == 200
    assert set(response.json()) == {"access", "refresh"}


def test_register_refuses_a_duplicate_username(alice: Any) -> None:
    response = anon().post("/api/auth/register/", {"username": "alice", "password": STRONG}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "username" in error["details"]
    assert get_user_model().objects.filter(username="alice").count() == 1


@pytest.mark.parametrize("password", ["123", "password", "12345678901", "qwertyuiop"])
def test_register_refuses_a_weak_password(password: str) -> None:
    response = anon().post("/api/auth/register/", {"username": "dora", "password": password}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert error["details"]["password"] and all(isinstance(m, str) for m in error["details"]["password"])
    assert not get_user_model().objects.filter(username="dora").exists()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"password": STRONG}, "username"),
        ({"username": "dora"}, "password"),
        ({"username": "", "password": STRONG}, "username"),
        ({"username": ["dora"], "password": STRONG}, "username"),
        ({"username": "dora", "password": STRONG, "email": "d@example.com"}, "email"),
        ({"username": "x" * 151, "password": STRONG}, "username"),
    ],
)
def test_register_refuses_bad_fields(body: dict[str, Any], field: str) -> None:
    response = anon().post("/api/auth/register/", body, format="json")
    error = assert_error(response, 400, "validation_error")
    assert field in error["details"]
    assert get_user_model().objects.count() == 0


@pytest.mark.parametrize("username", ["dora smith", "dora/x", "dora?", "<b>dora</b>"])
def test_register_refuses_usernames_that_cannot_be_used_in_urls(username: str) -> None:
    response = anon().post("/api/auth/register/", {"username": username, "password": STRONG}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "username" in error["details"]
    assert get_user_model().objects.count() == 0


def test_register_is_forbidden_when_signup_is_disabled(settings: Any) -> None:
    settings.TANDEM_ALLOW_SIGNUP = False
    response = anon().post("/api/auth/register/", {"username": "dora", "password": STRONG}, format="json")
    assert_error(response, 403, "permission_denied")
    assert not get_user_model().objects.filter(username="dora").exists()


# ---------------------------------------------------------------- tokens


def test_token_obtain_returns_access_and_refresh(alice: Any) -> None:
    response = anon().post("/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access", "refresh"}
    assert int(AccessToken(body["access"])["user_id"]) == alice.pk
    me = APIClient()
    me.credentials(HTTP_AUTHORIZATION=f"Bearer {body['access']}")
    assert me.get("/api/sessions/").status_code == 200


@pytest.mark.parametrize(
    "username, password", [("alice", "wrong-password-1"), ("nobody", PASSWORD), ("ALICE", PASSWORD)]
)
def test_token_obtain_with_bad_credentials_is_401(alice: Any, username: str, password: str) -> None:
    response = anon().post("/api/auth/token/", {"username": username, "password": password}, format="json")
    assert_error(response, 401, "authentication_failed")


def test_token_obtain_for_an_inactive_user_is_401(alice: Any) -> None:
    alice.is_active = False
    alice.save()
    response = anon().post("/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json")
    assert_error(response, 401, "authentication_failed")


def test_token_obtain_without_a_password_is_400(alice: Any) -> None:
    response = anon().post("/api/auth/token/", {"username": "alice"}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "password" in error["details"]


def test_refresh_returns_a_new_working_access_token(alice: Any) -> None:
    refresh = str(RefreshToken.for_user(alice))
    response = anon().post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
    assert response.status_code == 200
    access = response.json()["access"]
    assert int(AccessToken(access)["user_id"]) == alice.pk
    me = APIClient()
    me.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    assert me.get("/api/sessions/").status_code == 200


@pytest.mark.parametrize("refresh", ["garbage", "a.b.c"])
def test_refresh_with_a_bad_token_is_401(refresh: str) -> None:
    response = anon().post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
    assert_error(response, 401, "authentication_failed")


def test_refresh_refuses_an_access_token(alice: Any) -> None:
    response = anon().post("/api/auth/token/refresh/", {"refresh": token_for(alice)}, format="json")
    assert_error(response, 401, "authentication_failed")


def test_refresh_token_is_not_an_access_token(alice: Any) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(alice)}")
    assert_error(client.get("/api/sessions/"), 401, "authentication_failed")


# ---------------------------------------------------------------- ticket


def test_ticket_is_issued_for_the_caller(alice: Any, api: Any) -> None:
    response = api(alice).post("/api/auth/ticket/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"ticket", "expires_in"}
    assert body["expires_in"] == 60
    assert read_ticket(body["ticket"]) == (alice.pk, None)


def test_ticket_needs_authentication() -> None:
    assert_error(anon().post("/api/auth/ticket/"), 401, "not_authenticated")


def test_ticket_is_not_a_rest_credential(alice: Any, api: Any) -> None:
    ticket = api(alice).post("/api/auth/ticket/").json()["ticket"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ticket}")
    assert_error(client.get("/api/sessions/"), 401, "authentication_failed")
    assert_error(anon().get(f"/api/sessions/?ticket={ticket}"), 401, "not_authenticated")


# ---------------------------------------------------------------- bad credentials


def _with_header(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=value)
    return client


def test_basic_auth_is_a_bad_credential(alice: Any) -> None:
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    response = _with_header(f"Basic {basic}").get("/api/sessions/")
    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_token_scheme_is_a_bad_credential(alice: Any) -> None:
    assert_error(_with_header(f"Token {token_for(alice)}").get("/api/sessions/"), 401, "authentication_failed")


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "bearer x", "Bearer a b", ""])
def test_malformed_bearer_header_is_a_bad_credential(alice: Any, value: str) -> None:
    assert_error(_with_header(value).get("/api/sessions/"), 401, "authentication_failed")


def test_lowercase_bearer_with_a_valid_token_is_a_bad_credential(alice: Any) -> None:
    assert_error(_with_header(f"bearer {token_for(alice)}").get("/api/sessions/"), 401, "authentication_failed")


def test_forged_jwt_is_a_bad_credential(alice: Any) -> None:
    token = AccessToken.for_user(alice)
    header, payload, _sig = str(token).split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}"
    assert_error(_with_header(f"Bearer {forged}").get("/api/sessions/"), 401, "authentication_failed")


def test_jwt_signed_with_another_key_is_a_bad_credential(alice: Any) -> None:
    import jwt

    forged = jwt.encode(
        {"token_type": "access", "user_id": str(alice.pk), "exp": 9999999999, "jti": "x"},
        "not-the-server-key-but-long-enough-for-hs256",
        algorithm="HS256",
    )
    assert_error(_with_header(f"Bearer {forged}").get("/api/sessions/"), 401, "authentication_failed")


def test_expired_access_token_is_a_bad_credential(alice: Any) -> None:
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=-timedelta(seconds=5))
    assert_error(_with_header(f"Bearer {token}").get("/api/sessions/"), 401, "authentication_failed")


def test_token_of_a_deleted_user_is_a_bad_credential(alice: Any) -> None:
    token = token_for(alice)
    alice.delete()
    assert_error(_with_header(f"Bearer {token}").get("/api/sessions/"), 401, "authentication_failed")


def test_token_of_a_deactivated_user_is_a_bad_credential(alice: Any) -> None:
    token = token_for(alice)
    alice.is_active = False
    alice.save()
    assert_error(_with_header(f"Bearer {token}").get("/api/sessions/"), 401, "authentication_failed")


def test_token_whose_user_id_is_not_a_number_is_a_bad_credential(alice: Any) -> None:
    token = AccessToken.for_user(alice)
    token["user_id"] = "1 OR 1=1"
    assert_error(_with_header(f"Bearer {token}").get("/api/sessions/"), 401, "authentication_failed")


def test_no_credentials_is_not_authenticated() -> None:
    response = anon().get("/api/sessions/")
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_query_token_is_ignored_on_rest_endpoints(alice: Any) -> None:
    response = anon().get(f"/api/sessions/?token={token_for(alice)}")
    assert_error(response, 401, "not_authenticated")


def test_query_token_does_not_override_a_bad_header(alice: Any) -> None:
    response = _with_header("Token nope").get(f"/api/sessions/?token={token_for(alice)}")
    assert_error(response, 401, "authentication_failed")


# ---------------------------------------------------------------- session cookie


def test_session_cookie_authenticates_a_get(alice: Any) -> None:
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    response = client.get("/api/sessions/")
    assert response.status_code == 200
    assert response.json() == {"results": [], "next": None}


def test_session_cookie_post_without_csrf_is_forbidden(alice: Any) -> None:
    from sessions_app.models import Session

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    response = client.post("/api/sessions/", {"title": "x"}, format="json")
    assert_error(response, 403, "permission_denied")
    assert Session.objects.count() == 0


def test_session_cookie_post_with_csrf_token_succeeds(alice: Any) -> None:
    from django.middleware.csrf import _get_new_csrf_string, _mask_cipher_secret

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    secret = _get_new_csrf_string()
    client.cookies["csrftoken"] = secret
    response = client.post(
        "/api/sessions/", {"title": "x"}, format="json", HTTP_X_CSRFTOKEN=_mask_cipher_secret(secret)
    )
    assert response.status_code == 201, response.content
    assert response.json()["owner"]["username"] == "alice"


def test_session_cookie_is_rejected_after_logout(alice: Any) -> None:
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    client.logout()
    assert_error(client.get("/api/sessions/"), 401, "not_authenticated")


def test_bad_authorization_header_is_not_rescued_by_a_session_cookie(alice: Any) -> None:
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    client.credentials(HTTP_AUTHORIZATION="Token nope")
    assert_error(client.get("/api/sessions/"), 401, "authentication_failed")


@pytest.mark.parametrize("path", ["/api/auth/token/", "/api/auth/token/refresh/"])
def test_token_endpoints_refuse_unknown_fields(alice: Any, path: str) -> None:
    body = {"username": "alice", "password": PASSWORD, "remember_me": True}
    if path.endswith("refresh/"):
        body = {"refresh": "x", "remember_me": True}
    response = APIClient().post(path, body, format="json")
    assert_error(response, 400, "validation_error")
    assert "remember_me" in response.json()["error"]["details"]
