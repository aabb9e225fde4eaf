"""Fork from here, the export download and search in the browser: real Chromium, real
daphne, the real pages."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
from playwright.sync_api import expect

from sessions_app.models import Message, Session
from tests.test_browser_ui import (  # noqa: F401 (browse: the harness's, checked for page errors)
    STREAM,
    api_post,
    assistant,
    browse,
    open_session,
    send,
    user_messages,
    wait_reply,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_fork_from_here_opens_the_new_session_with_the_conversation_so_far(
    browse: Any, alice: Any, bob: Any, shared_session: Session  # noqa: F811
) -> None:
    page = open_session(browse(bob), shared_session.id)
    send(page, "first question")
    wait_reply(page, "first question")
    send(page, "second question")
    wait_reply(page, "second question")
    first_reply = assistant(page, 0)
    first_reply.get_by_role("button", name="Fork from here").click()
    page.wait_for_url(re.compile(r"/s/(?!%s)[^/]+/$" % shared_session.id))
    fork_id = page.url.rstrip("/").rsplit("/", 1)[1]
    expect(page.locator("#connection")).to_have_attribute("data-state", re.compile("^live$"), timeout=15_000)
    expect(page.locator("#messages > li")).to_have_count(2)
    expect(user_messages(page).locator(".message-body")).to_have_text(["first question"])
    expect(page.locator("#session-role")).to_have_text("owner")
    expect(page.locator("#forked-from a")).to_have_attribute(
        "href", f"/s/{shared_session.id}/#m-{Message.objects.filter(session=shared_session)[1].id}"
    )
    fork = Session.objects.get(pk=fork_id)
    assert (fork.owner_id, fork.forked_from_session_id) == (bob.pk, shared_session.id)
    # The fork is a live session of its own.
    send(page, "in the fork")
    wait_reply(page, "in the fork")
    assert Message.objects.filter(session=shared_session).count() == 4


def test_export_downloads_markdown_and_json(browse: Any, carol: Any, bob: Any, live: Any, shared_session: Session) -> None:  # noqa: F811
    api_post(live, bob, f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": "export me"}]})
    page = open_session(browse(carol), shared_session.id)  # a viewer may export
    wait_reply(page, "export me")
    with page.expect_download() as info:
        page.locator("#export-markdown").click()
    download = info.value
    assert download.suggested_filename == f"tandem-{shared_session.id}.md"
    text = download.path().read_text(encoding="utf-8")
    assert text.startswith("# Fix the login bug\n") and text.count("export me") == 2
    with page.expect_download() as info:
        page.locator("#export-json").click()
    data = json.loads(info.value.path().read_text(encoding="utf-8"))
    assert [m["parts"][0]["text"] for m in data["messages"]] == ["export me", "export me"]


def test_search_shows_highlighted_snippets_that_open_the_session_at_the_message(
    browse: Any, alice: Any, bob: Any, charlie: Any, live: Any, shared_session: Session  # noqa: F811
) -> None:
    api_post(live, bob, f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": "where is the walrus config"}]})
    wait_until_idle(shared_session)
    for _ in range(12):  # enough messages that the target is not where the page starts
        Message.objects.create(session=shared_session, role="user", author=bob, status="completed")
    page = browse(alice)
    page.get_by_label("Search your sessions").fill("walrus")
    page.get_by_role("button", name="Search").click()
    hits = page.locator("#search-results > li")
    expect(hits).to_have_count(2)  # the message and the echo of it
    expect(hits.first.locator("mark")).to_have_text(re.compile("^walrus$", re.I))
    expect(hits.first.locator(".search-snippet")).to_contain_text("where is the walrus config")
    target = hits.first.get_attribute("data-message-id")
    hits.first.locator("a").click()
    page.wait_for_url(re.compile(rf"/s/{shared_session.id}/#m-{target}$"))
    message = page.locator(f"#m-{target}")
    expect(message).to_have_class(re.compile(r"\bmessage-target\b"))
    expect(message).to_be_in_viewport()
    # Back returns to the same results (the query is in the URL).
    page.go_back()
    expect(page.get_by_label("Search your sessions")).to_have_value("walrus")
    expect(page.locator("#search-results > li")).to_have_count(2)
    # charlie is not a member: nothing of alice's.
    other = browse(charlie)
    other.get_by_label("Search your sessions").fill("walrus")
    other.get_by_role("button", name="Search").click()
    expect(other.locator("#search-status")).to_have_text(re.compile("Nothing found"))
    expect(other.locator("#search-results > li")).to_have_count(0)


def test_a_search_hit_with_markup_stays_inert(browse: Any, alice: Any, live: Any, shared_session: Session) -> None:  # noqa: F811
    payload = '<img src=x onerror="window.__pwned=1"> <b>bold</b> quokka <script>window.__pwned=2</script>'
    api_post(live, alice, f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": payload}]})
    wait_until_idle(shared_session)
    page = browse(alice)
    page.get_by_label("Search your sessions").fill("quokka")
    page.get_by_role("button", name="Search").click()
    hits = page.locator("#search-results > li")
    expect(hits).to_have_count(2)
    expect(hits.first.locator(".search-snippet")).to_contain_text('<img src=x onerror="window.__pwned=1">')
    expect(hits.first.locator("mark")).to_have_text("quokka")
    expect(page.locator("#search-results img")).to_have_count(0)
    expect(page.locator("#search-results b")).to_have_count(0)
    expect(page.locator("#search-results script")).to_have_count(0)
    expect(page.locator("#search-results [onerror]")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None
    # A query with markup is text too.
    page.get_by_label("Search your sessions").fill("<img src=x onerror=window.__pwned=3>")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#search-status")).not_to_have_text("Searching…")
    expect(page.locator("#search-results img, #search-status img")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None


def wait_until_idle(session: Session) -> None:
    from tests.replies import wait_idle

    wait_idle(session.id, timeout=STREAM / 1000)
