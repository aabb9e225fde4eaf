"""The browser harness itself: Chromium starts and a person logs in."""
from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_person_logs_in_and_lands_on_their_sessions(browse: Any, alice: Any) -> None:
    page = browse(alice)
    assert page.locator("#sessions-app").get_attribute("data-username") == "alice"
