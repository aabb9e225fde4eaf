"""A person makes an API key in the browser, a program uses it, and the person revokes it."""
from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_a_person_makes_a_key_a_program_uses_it_and_the_person_revokes_it(
    browse: Any, live: Any, alice: Any
) -> None:
    page = browse(alice)
    page.locator("#account-menu summary").click()
    page.get_by_role("link", name="API keys").click()
    page.wait_for_url("**/accounts/keys/")
    assert page.locator("#no-keys").is_visible()
    page.get_by_label("Name").fill("my script")
    page.get_by_role("button", name="Make a key").click()
    raw = page.get_by_label("The new API key").input_value()
    assert raw.startswith("tdm_")
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {raw}"}) as program:
        assert program.get("/api/sessions/").status_code == 200
        page.reload()  # shown once: not on the page any more
        assert page.get_by_label("The new API key").count() == 0
        assert page.locator(".key-list li .key-name").all_inner_texts() == ["my script"]
        page.get_by_role("button", name="Revoke").click()
        page.wait_for_selector("#no-keys")
        assert program.get("/api/sessions/").status_code == 401
    assert not [m for m in page.console_messages if m.startswith(("error", "pageerror"))]
