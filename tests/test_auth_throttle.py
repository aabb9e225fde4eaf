"""Password guessing is throttled (issue 10, item 3): the sign-in endpoints count
requests per client address (TANDEM_RATE_AUTH_IP) and per account (TANDEM_RATE_AUTH_USER),
in Redis across every process, and answer 429 ``rate_limited`` with ``Retry-After``."""
from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from project.limits import client_ip
from tests.conftest import PASSWORD, token_for
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db


def fresh_window() -> None:
    """The limits count in fixed windows (an hour here): never straddle two."""
    left = 3600 - time.time() % 3600
    if left < 30:
        time.sleep(left + 0.1)


def login(username: str, password: str = "wrong-password", ip: str = "198.51.100.1", **extra: str) -> Any:
    return APIClient().post(
        "/api/auth/token/", {"username": username, "password": password}, format="json", REMOTE_ADDR=ip, **extra
    )


def assert_throttled(response: Any) -> None:
    assert_error(response, 429, "rate_limited")
    assert 1 <= int(response["Retry-After"]) <= 3600


def test_guessing_one_accounts_password_from_many_addresses_is_throttled(alice: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_USER = "3/hour"
    fresh_window()
    for i in range(3):
        assert login("alice", ip=f"203.0.113.{i}").status_code == 401
    assert_throttled(login("alice", ip="203.0.113.99"))
    assert_throttled(login("alice", PASSWORD, ip="203.0.113.100"))  # the window is closed to all
    assert login("bob", PASSWORD, ip="203.0.113.99").status_code == 200  # other accounts are not


def test_an_unknown_username_is_throttled_like_a_real_one(settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_USER = "2/hour"
    fresh_window()
    assert login("nobody").status_code == 401
    assert login("nobody").status_code == 401
    assert_throttled(login("nobody"))


def test_one_address_trying_many_accounts_is_throttled(alice: Any, settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_IP = "3/hour"
    fresh_window()
    for name in ("u1", "u2", "u3"):
        assert login(name, ip="203.0.113.7").status_code == 401
    assert_throttled(login("u4", ip="203.0.113.7"))
    assert login("alice", PASSWORD, ip="203.0.113.8").status_code == 200


def test_register_is_throttled_per_address(settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_IP = "2/hour"
    fresh_window()
    client = APIClient(REMOTE_ADDR="203.0.113.20")
    for name in ("new1", "new2"):
        body = {"username": name, "password": "plum-orbit-lantern-72"}
        assert client.post("/api/auth/register/", body, format="json").status_code == 201
    assert_throttled(client.post("/api/auth/register/", {"username": "new3", "password": "plum-orbit-lantern-72"}, format="json"))


def test_tickets_and_refreshes_are_throttled_per_user(alice: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_USER = settings.TANDEM_RATE_TICKET = "2/hour"
    fresh_window()
    as_alice = APIClient()
    as_alice.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}")
    for _ in range(2):
        assert as_alice.post("/api/auth/ticket/").status_code == 200
    assert_throttled(as_alice.post("/api/auth/ticket/"))

    refresh = str(RefreshToken.for_user(alice))
    for i in range(2):  # from two addresses: the account is counted, wherever it asks from
        response = APIClient(REMOTE_ADDR=f"203.0.113.{i}").post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
        assert response.status_code == 200
    assert_throttled(APIClient().post("/api/auth/token/refresh/", {"refresh": refresh}, format="json"))
    # Counted per endpoint and per account: bob's tickets and alice's logins are untouched.
    as_bob = APIClient(REMOTE_ADDR="203.0.113.9")
    as_bob.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(bob)}")
    assert as_bob.post("/api/auth/ticket/").status_code == 200
    assert login("alice", PASSWORD).status_code == 200


def test_forged_refresh_tokens_cannot_lock_a_user_out(alice: Any, settings: Any) -> None:
    import jwt

    settings.TANDEM_RATE_AUTH_USER = "2/hour"
    fresh_window()
    forged = jwt.encode(
        {"token_type": "refresh", "user_id": str(alice.pk), "exp": 9999999999, "jti": "x"}, "k" * 40, algorithm="HS256"
    )
    for _ in range(5):
        response = APIClient().post("/api/auth/token/refresh/", {"refresh": forged}, format="json")
        assert response.status_code == 401
    real = str(RefreshToken.for_user(alice))
    assert APIClient().post("/api/auth/token/refresh/", {"refresh": real}, format="json").status_code == 200


def test_behind_the_proxy_each_client_is_counted_by_its_forwarded_address(alice: Any, settings: Any) -> None:
    settings.TANDEM_RATE_AUTH_IP = "2/hour"
    fresh_window()
    # nginx on this machine appends the address it saw to whatever the client sent.
    for forged in ("1.1.1.1", "2.2.2.2"):
        assert login("x", ip="127.0.0.1", HTTP_X_FORWARDED_FOR=f"{forged}, 198.51.100.50").status_code == 401
    assert_throttled(login("x", ip="127.0.0.1", HTTP_X_FORWARDED_FOR="3.3.3.3, 198.51.100.50"))
    assert login("x", ip="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.51").status_code == 401
    # A client that is not a trusted proxy cannot pick its address with the header.
    for forged in ("4.4.4.4", "5.5.5.5"):
        assert login("x", ip="203.0.113.60", HTTP_X_FORWARDED_FOR=forged).status_code == 401
    assert_throttled(login("x", ip="203.0.113.60", HTTP_X_FORWARDED_FOR="6.6.6.6"))


def test_client_address_reads_x_forwarded_for_only_from_trusted_proxies(settings: Any) -> None:
    settings.TANDEM_TRUSTED_PROXIES = ["127.0.0.1", "10.0.0.0/8"]
    assert client_ip({"REMOTE_ADDR": "203.0.113.1", "HTTP_X_FORWARDED_FOR": "9.9.9.9"}) == "203.0.113.1"
    assert client_ip({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "9.9.9.9, 203.0.113.1"}) == "203.0.113.1"
    assert client_ip({"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": "203.0.113.1, 10.0.0.5"}) == "203.0.113.1"
    assert client_ip({"REMOTE_ADDR": "127.0.0.1"}) == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.redis
def test_the_limit_holds_across_processes(servers: Any, alice: Any) -> None:
    first, second = servers(2, redis=True, TANDEM_RATE_AUTH_USER="4/hour", TANDEM_RATE_AUTH_IP="none")
    fresh_window()
    statuses = [
        httpx.post(f"{server.url}/api/auth/token/", json={"username": "alice", "password": "nope"}, timeout=10).status_code
        for server in (first, second, first, second)
    ]
    assert statuses == [401] * 4
    for server in (first, second):
        refused = httpx.post(f"{server.url}/api/auth/token/", json={"username": "alice", "password": PASSWORD}, timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1


def test_the_login_pages_share_the_apis_password_limit(alice: Any, settings: Any) -> None:
    from django.test import Client

    settings.TANDEM_RATE_AUTH_USER = "3/hour"
    fresh_window()
    browser = Client(REMOTE_ADDR="203.0.113.70")
    assert browser.post("/accounts/login/", {"username": "alice", "password": "guess1"}).status_code == 200
    assert browser.post("/admin/login/", {"username": "alice", "password": "guess2"}).status_code == 200
    assert login("alice").status_code == 401
    for path in ("/accounts/login/", "/admin/login/"):
        refused = browser.post(path, {"username": "alice", "password": PASSWORD})
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
    assert_throttled(login("alice", PASSWORD))
    assert browser.get("/accounts/login/").status_code == 200  # the form itself still shows


def test_the_signup_page_is_throttled_per_address(settings: Any) -> None:
    from django.test import Client

    settings.TANDEM_RATE_AUTH_IP = "1/hour"
    fresh_window()
    browser = Client(REMOTE_ADDR="203.0.113.80")
    form = {"username": "newbie", "password1": "plum-orbit-lantern-72", "password2": "plum-orbit-lantern-72"}
    assert browser.post("/accounts/signup/", form).status_code == 302
    assert browser.post("/accounts/signup/", {**form, "username": "newbie2"}).status_code == 429
