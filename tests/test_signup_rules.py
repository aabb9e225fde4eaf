"""One way to create a user (``services.create_user``): the API's register endpoint and
the sign-up page refuse the same names and passwords, with the same messages, and create
no user when they do."""
from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

STRONG = "plum-orbit-lantern-72"

BAD = [
    # (username, password, the field refused)
    ("Alice", STRONG, "username"),  # alice exists: names differ in letter case only
    ("dora\n", STRONG, "username"),  # not trimmed into "dora"
    ("dora/x", STRONG, "username"),
    ("x" * 151, STRONG, "username"),
    ("dora", "123", "password"),
    ("dora", "dora-" + "7" * 5000, "password"),  # bounded before hashing
]


def via_api(username: str, password: str) -> tuple[int, list[str]]:
    response = APIClient().post(
        "/api/auth/register/", {"username": username, "password": password}, format="json"
    )
    if response.status_code == 201:
        return 201, []
    error = assert_error(response, 400, "validation_error")
    return 400, [m for messages in error["details"].values() for m in messages]


def via_page(username: str, password: str) -> tuple[int, list[str]]:
    response = Client().post(
        "/accounts/signup/", {"username": username, "password1": password, "password2": password}
    )
    if response.status_code == 302:
        return 201, []
    assert response.status_code == 200
    return 400, [m for messages in response.context["form"].errors.values() for m in messages]


@pytest.mark.parametrize("username, password, field", BAD)
def test_the_api_and_the_page_refuse_the_same_sign_ups_alike(
    alice: Any, username: str, password: str, field: str
) -> None:
    api_status, api_messages = via_api(username, password)
    page_status, page_messages = via_page(username, password)
    assert (api_status, page_status) == (400, 400)
    assert api_messages and api_messages == page_messages
    assert get_user_model().objects.count() == 1  # alice only


def test_the_api_reports_the_refused_field(alice: Any) -> None:
    for username, password, field in BAD:
        response = APIClient().post(
            "/api/auth/register/", {"username": username, "password": password}, format="json"
        )
        assert field in assert_error(response, 400, "validation_error")["details"], username


@pytest.mark.parametrize("path", ["api", "page"])
def test_a_good_sign_up_creates_the_user_on_both_paths(path: str) -> None:
    status, messages = (via_api if path == "api" else via_page)("dora", STRONG)
    assert (status, messages) == (201, [])
    assert get_user_model().objects.get(username="dora").check_password(STRONG)
