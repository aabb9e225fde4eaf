"""docs/API.md says what the code does (issue 10, item 25): each statement here is checked
against the running code, not only read."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.conftest import token_for
from tests.streamutil import SSEClient, bind_runtime, stream_path

API = (Path(__file__).resolve().parent.parent / "docs" / "API.md").read_text()


def _statement(pattern: str) -> str:
    match = re.search(pattern, API, re.DOTALL)
    assert match, f"docs/API.md no longer says {pattern!r}"
    return match.group(0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("session_scoped", [True, False])
async def test_stream_endpoints_answer_other_methods_with_the_documented_405_code(
    alice: Any, session_scoped: bool
) -> None:
    bind_runtime()
    client = SSEClient(stream_path("ses_x" if session_scoped else None), params={"token": token_for(alice)}, method="POST")
    assert await client.open() == 405
    code = (await client.json())["error"]["code"]
    documented = _statement(r"Stream endpoints answer methods other than `GET` and `HEAD` with `405`[^\n]*\n[^\n]*")
    assert f"`{code}`" in documented and "`bad_request`" not in documented, documented
    assert re.search(rf"\| `{code}` \| 405 \|", API)  # and the table of codes agrees


def test_the_login_pages_the_docs_name_exist(db: None) -> None:
    documented = _statement(r"Browser pages sign in with a cookie:.*?staff\s+users only\.")
    assert "The only login page" not in API
    for path in re.findall(r"`(?:POST )?(/accounts/[a-z]+/)`", documented):
        response = Client().get(path)
        assert response.status_code in (200, 403, 405), (path, response.status_code)
    page = Client().get("/accounts/login/")
    assert page.status_code == 200 and b'name="password"' in page.content
