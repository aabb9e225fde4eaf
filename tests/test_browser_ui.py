"""The browser UI end to end: real Chromium, real daphne, the real pages and streams.

Every wait is a bounded Playwright expectation (or ``wait_until`` on the database);
nothing sleeps to make an assertion pass."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from sessions_app.models import Part, Session
from tests.conftest import PASSWORD, token_for, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LIVE = re.compile("^live$")
STREAM = 20_000  # ms: the longest a reply in these tests may take


# ---------------------------------------------------------------- helpers


@pytest.fixture
def browse(browse: Any) -> Any:
    """The harness's ``browse``, and afterwards: no page threw an uncaught error."""
    pages: list[Any] = []

    def open_page(*args: Any, **kwargs: Any) -> Any:
        page = browse(*args, **kwargs)
        pages.append(page)
        return page

    yield open_page
    errors = [m for page in pages for m in page.console_messages if m.startswith("pageerror")]
    assert not errors, errors



def open_session(page: Any, session_id: str) -> Any:
    """Go to a session page and wait until its stream is connected."""
    page.goto(f"/s/{session_id}/")
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(page.locator("#messages-loading")).to_be_hidden()
    return page


def composer(page: Any) -> Any:
    return page.get_by_label("Message", exact=True)


def send(page: Any, text: str) -> None:
    # The page ignores Enter while its previous POST is in flight (the form is aria-busy);
    # on a loaded machine that POST can answer after its own events have streamed in.
    expect(page.locator("#composer")).not_to_have_attribute("aria-busy", "true", timeout=STREAM)
    box = composer(page)
    box.fill(text)
    box.press("Enter")


def assistant(page: Any, index: int = -1) -> Any:
    replies = page.locator("#messages > li.message-assistant")
    return replies.last if index == -1 else replies.nth(index)


def user_messages(page: Any) -> Any:
    return page.locator("#messages > li.message-user")


def wait_reply(page: Any, text: str, index: int = -1) -> Any:
    reply = assistant(page, index)
    expect(reply).to_have_attribute("data-status", "completed", timeout=STREAM)
    expect(reply.locator(".part-text").last).to_have_text(text, timeout=5_000)
    return reply


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(1, n + 1))


def no_horizontal_scroll(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def api_post(live: Any, user: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=10)


# ---------------------------------------------------------------- accounts


def test_sign_up_log_out_and_log_in_through_the_pages(browse: Any, live: Any) -> None:
    page = browse(None)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    page.get_by_role("link", name="Sign up").click()
    expect(page.get_by_role("heading", name="Create your Tandem account")).to_be_visible()

    # A refused form keeps its fields and says why.
    page.get_by_label("Username").fill("dora")
    page.get_by_label("Password", exact=True).fill("plum-orbit-lantern-72")
    page.get_by_label("Password confirmation").fill("something-else-72")
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("alert").first).to_be_visible()

    page.get_by_label("Password", exact=True).fill("plum-orbit-lantern-72")
    page.get_by_label("Password confirmation").fill("plum-orbit-lantern-72")
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(f"{live.url}/")
    expect(page.get_by_role("heading", name="Your sessions")).to_be_visible()
    expect(page.locator("#sessions-app")).to_have_attribute("data-username", "dora")
    expect(page.locator("#list-empty")).to_be_visible()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/(login|logout)/"))
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("dora")
    page.get_by_label("Password").fill("wrong-password-1")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("didn't match")
    page.get_by_label("Password").fill("plum-orbit-lantern-72")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live.url}/")
    expect(page.locator("#sessions-app")).to_have_attribute("data-username", "dora")


# ---------------------------------------------------------------- sessions list


def test_owner_creates_renames_and_deletes_sessions_in_the_list(browse: Any, alice: Any) -> None:
    page = browse(alice)
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    page.get_by_label("Title").fill("Plan the release")
    page.get_by_label("Agent").select_option("tools")
    page.get_by_role("button", name="Create session").click()
    # Creating a session opens it; the list has it too.
    expect(page).to_have_url(re.compile(r"/s/[^/]+/$"))
    expect(page.locator("#session-title")).to_have_text("Plan the release")
    page.goto("/")
    item = page.locator(".session-item", has_text="Plan the release")
    expect(item).to_have_count(1)
    expect(item).to_contain_text("agent tools")
    expect(item.locator(".badge")).to_have_text("idle")
    session_id = item.get_attribute("data-session-id")
    assert Session.objects.get(pk=session_id).agent == "tools"

    item.get_by_role("button", name="Rename").click()
    rename = item.get_by_label(re.compile("New title"))
    expect(rename).to_be_focused()
    rename.fill("Plan the spring release")
    rename.press("Enter")
    expect(page.locator(f'[data-session-id="{session_id}"] .session-title')).to_have_text("Plan the spring release")
    assert Session.objects.get(pk=session_id).title == "Plan the spring release"

    item = page.locator(f'[data-session-id="{session_id}"]')
    item.get_by_role("button", name="Delete").click()
    dialog = page.get_by_role("dialog", name="Delete this session?")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(item).to_have_count(1)
    item.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete session").click()
    expect(item).to_have_count(0)
    assert not Session.objects.filter(pk=session_id).exists()


def test_list_badge_turns_busy_then_idle_live(browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page = browse(alice)
    item = page.locator(f'[data-session-id="{shared_session.id}"]')
    expect(item.get_by_role("link", name="Fix the login bug")).to_have_attribute("href", f"/s/{shared_session.id}/")
    badge = item.locator(".badge")
    expect(badge).to_have_text("idle")
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)

    response = api_post(live, bob, f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": words(60)}]})
    assert response.status_code == 202, response.text
    expect(badge).to_have_text("busy", timeout=10_000)
    expect(badge).to_have_attribute("data-status", "busy")
    expect(badge).to_have_text("idle", timeout=STREAM)

    # Editors and viewers see the session without owner controls.
    assert item.get_by_role("button", name="Delete").count() == 1
    other = browse(bob)
    bob_item = other.locator(f'[data-session-id="{shared_session.id}"]')
    expect(bob_item).to_contain_text("editor")
    expect(bob_item.get_by_role("button", name="Delete")).to_have_count(0)


# ---------------------------------------------------------------- the session page


def test_two_people_share_a_session_and_see_the_same_streamed_reply(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page_a = open_session(browse(alice), shared_session.id)
    page_b = open_session(browse(bob), shared_session.id)
    text = "Hello from alice, " + words(40) + " and **bold** end."
    send(page_a, text)
    expect(composer(page_a)).to_have_value("")

    for page in (page_a, page_b):
        expect(user_messages(page).last.locator(".message-body")).to_have_text(text, timeout=10_000)
        expect(user_messages(page).last).to_contain_text("alice")
        reply = assistant(page)
        expect(reply).to_have_attribute("data-status", "completed", timeout=STREAM)
        expect(reply.locator("strong")).to_have_text("bold")  # assistant text is Markdown
    final_a = assistant(page_a).locator(".message-body").inner_text()
    final_b = assistant(page_b).locator(".message-body").inner_text()
    assert final_a == final_b
    assert final_a.strip() == text.replace("**", "")
    # The stored reply is what both saw.
    part = Part.objects.filter(message__session=shared_session, message__role="assistant").get()
    assert part.text == text


def test_presence_and_typing_indicator(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page_a = open_session(browse(alice), shared_session.id)
    page_b = open_session(browse(bob), shared_session.id)
    for page in (page_a, page_b):
        expect(page.locator("#presence > li")).to_have_count(2, timeout=10_000)
        expect(page.locator('#presence > li[data-username="alice"]')).to_have_count(1)
        expect(page.locator('#presence > li[data-username="bob"]')).to_have_count(1)

    # A second tab of bob's still shows him once.
    page_b2 = open_session(browse(bob), shared_session.id)
    expect(page_b2.locator("#presence > li")).to_have_count(2, timeout=10_000)
    expect(page_a.locator('#presence > li[data-username="bob"]')).to_have_count(1)

    composer(page_b).press_sequentially("Hello th")
    expect(page_a.locator("#typing")).to_have_text("bob is typing…", timeout=5_000)
    expect(page_a.locator('#presence > li[data-username="bob"]')).to_have_attribute("data-typing", "true")
    expect(page_b.locator("#typing")).to_have_text("")  # not about yourself
    composer(page_b).press("Enter")
    expect(page_a.locator("#typing")).to_have_text("", timeout=5_000)

    page_b.close()
    page_b2.close()
    expect(page_a.locator('#presence > li[data-username="bob"]')).to_have_count(0, timeout=10_000)
    expect(page_a.locator('#presence > li[data-username="alice"]')).to_have_count(1)


def test_composer_refuses_empty_and_oversized_messages_and_shows_server_errors(
    browse: Any, alice: Any, shared_session: Session
) -> None:
    page = open_session(browse(alice), shared_session.id)
    error = page.locator("#composer-error")
    composer(page).press("Enter")
    expect(error).to_have_text("Write a message before sending.")
    send(page, "   \n  ")
    expect(error).to_have_text("Write a message before sending.")

    limit = int(page.locator("#session-app").get_attribute("data-max-chars"))
    composer(page).fill("x" * (limit + 1))
    expect(page.locator("#char-count")).to_have_text(re.compile(r"/"))
    page.get_by_role("button", name="Send", exact=True).click()
    expect(error).to_contain_text(f"{limit + 1:,} characters long")
    expect(composer(page)).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#messages > li")).to_have_count(0)
    assert not shared_session.messages.exists()

    # Shift+Enter is a new line, Enter sends.
    composer(page).fill("first line")
    composer(page).press("Shift+Enter")
    composer(page).press_sequentially("second line ")
    # Long enough (about 20 s at 15 ms a word) that the reply is surely still streaming
    # when the next message goes, even on a loaded machine; it is aborted below.
    page.keyboard.insert_text(words(1300))
    expect(error).to_be_hidden()
    composer(page).press("Enter")
    expect(user_messages(page)).to_have_count(1)
    assert "\n" in user_messages(page).first.locator(".message-body").inner_text()
    expect(assistant(page)).to_have_attribute("data-status", "streaming")
    # A second message while the reply streams waits in the queue (shown, marked queued).
    send(page, "too soon")
    queued = user_messages(page).last
    expect(queued).to_have_attribute("data-status", "queued", timeout=5_000)
    expect(composer(page)).to_have_value("")
    queued.get_by_role("button", name="Withdraw this queued message").click()
    expect(user_messages(page)).to_have_count(1)
    page.get_by_role("button", name="Abort reply").click()
    expect(assistant(page)).to_have_attribute("data-status", "cancelled", timeout=STREAM)


def test_viewer_cannot_send(browse: Any, carol: Any, shared_session: Session) -> None:
    page = open_session(browse(carol), shared_session.id)
    expect(composer(page)).to_be_disabled()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_disabled()
    expect(page.locator("#composer-hint")).to_contain_text("You are a viewer")
    expect(page.locator("#session-role")).to_have_text("viewer")
    expect(page.locator("#invite-form")).to_have_count(0)
    expect(page.locator('#members > li[data-username="alice"]')).to_contain_text("owner")


# Permission requests are answered inline on the tool card: tests/test_browser_conversation.py.


def test_html_and_script_in_messages_are_inert(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page = open_session(browse(alice), shared_session.id)
    other = open_session(browse(bob), shared_session.id)
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> [link](javascript:alert(1))'
    send(page, payload)
    for p in (page, other):
        reply = assistant(p)
        expect(reply).to_have_attribute("data-status", "completed", timeout=STREAM)
        expect(user_messages(p).last.locator(".message-body")).to_have_text(payload)
        expect(reply.locator(".message-body")).to_contain_text("<script>window.__pwned=2</script>")
        expect(p.locator("#messages img")).to_have_count(0)
        expect(p.locator("#messages script")).to_have_count(0)
        expect(p.locator("#messages [onerror]")).to_have_count(0)
        expect(p.locator('#messages a[href^="javascript"]')).to_have_count(0)
        assert p.evaluate("window.__pwned") is None
    # Also when loaded from history rather than live.
    page.reload()
    expect(assistant(page)).to_have_attribute("data-status", "completed")
    expect(page.locator("#messages img")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None


def test_a_dropped_connection_resumes_without_losing_or_repeating_words(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice), shared_session.id)
    text = words(300, "word")
    send(page, text)
    body = assistant(page).locator(".message-body")
    expect(body).to_contain_text("word20 ", timeout=10_000)

    page.context.set_offline(True)
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", re.compile("offline|reconnecting"), timeout=10_000)
    expect(connection).to_contain_text(re.compile("Offline|Reconnecting"))
    shown = len(body.inner_text())
    # The reply goes on on the server meanwhile.
    reply_part = Part.objects.filter(message__session=shared_session, message__role="assistant")
    wait_until(lambda: len(reply_part.get().text) > shown + 200, timeout=10)

    page.context.set_offline(False)
    expect(connection).to_have_attribute("data-state", LIVE, timeout=20_000)
    reply = wait_reply(page, text)
    assert reply.locator(".part-text").inner_text().strip() == text


def test_abort_stops_the_reply_and_the_composer_works_again(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice), shared_session.id)
    send(page, words(600))
    reply = assistant(page)
    expect(reply.locator(".message-body")).to_contain_text("w10 ", timeout=10_000)
    abort = page.get_by_role("button", name="Abort reply")
    expect(abort).to_be_visible()
    abort.click()
    expect(reply).to_have_attribute("data-status", "cancelled", timeout=5_000)
    expect(reply.locator(".message-status")).to_have_text("cancelled")
    expect(page.locator("#session-status")).to_have_text("idle", timeout=5_000)
    expect(abort).to_be_hidden()
    assert "w600" not in reply.locator(".message-body").inner_text()

    expect(composer(page)).to_be_enabled()
    send(page, "after the abort")
    wait_reply(page, "after the abort")


def test_queued_messages_withdraw_send_now_and_retry(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    page = open_session(browse(bob), shared_session.id)
    other = open_session(browse(alice), shared_session.id)
    send(page, words(600))
    first = assistant(page, 0)
    expect(first.locator(".message-body")).to_contain_text("w5 ", timeout=10_000)

    # Sent while busy: shown at once, marked queued, with a withdraw button for its author
    # only (alice, the owner, also gets one; carol and other editors would not).
    send(page, "queued one")
    mine = page.locator("#messages > li.message-user", has_text="queued one")
    expect(mine).to_have_attribute("data-status", "queued")
    expect(mine.locator(".message-status")).to_have_text("queued")
    theirs = other.locator("#messages > li.message-user", has_text="queued one")
    expect(theirs).to_have_attribute("data-status", "queued", timeout=5_000)
    send(page, "queued two")
    expect(page.locator('#messages > li[data-status="queued"]')).to_have_count(2)
    # Queued messages stay at the end, after the streaming reply.
    expect(page.locator("#messages > li").last).to_contain_text("queued two")

    # Withdrawn by its author: gone for everyone.
    mine.get_by_role("button", name="Withdraw this queued message").click()
    expect(mine).to_have_count(0)
    expect(theirs).to_have_count(0, timeout=5_000)

    # "Send now" interrupts: the running reply ends cancelled, this message goes next.
    composer(page).fill("right now")
    page.get_by_role("button", name="Send now").click()
    expect(first).to_have_attribute("data-status", "cancelled", timeout=STREAM)
    expect(page.locator('#messages > li[data-status="queued"]')).to_have_count(0, timeout=STREAM)
    expect(page.locator("#session-status")).to_have_text("idle", timeout=STREAM)
    replies = page.locator("#messages > li.message-assistant")
    expect(replies).to_have_count(3)
    expect(replies.nth(1).locator(".part-text")).to_have_text("right now")
    expect(replies.nth(2).locator(".part-text")).to_have_text("queued two")
    # The transcript is in the order of the turns.
    texts = [t.strip() for t in page.locator("#messages > li.message-user .message-body").all_inner_texts()]
    assert texts[1:] == ["right now", "queued two"], texts

    # Retry: only on the latest ended reply; the earlier attempt folds away.
    retry = page.get_by_role("button", name="Retry this reply")
    expect(retry).to_have_count(1)
    expect(replies.nth(2).get_by_role("button", name="Retry this reply")).to_be_visible()
    retry.click()
    expect(replies).to_have_count(4, timeout=STREAM)
    expect(replies.nth(3)).to_have_attribute("data-status", "completed", timeout=STREAM)
    expect(replies.nth(3).locator(".part-text")).to_have_text("queued two")
    superseded = replies.nth(2)
    expect(superseded).to_have_class(re.compile("message-superseded"))
    expect(superseded.locator(".message-body")).to_be_hidden()
    superseded.get_by_role("button", name="Show earlier attempt").click()
    expect(superseded.locator(".message-body")).to_be_visible()
    # The other page saw it fold live, and a reload shows the same.
    expect(other.locator("#messages > li.message-superseded")).to_have_count(1, timeout=5_000)
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(page.locator("#messages > li.message-superseded")).to_have_count(1)
    expect(page.get_by_role("button", name="Retry this reply")).to_have_count(1)
    # An ended reply's Retry is secondary; the cancelled one had no Retry (not the latest).
    expect(page.get_by_role("button", name="Retry this reply")).to_have_class(re.compile("secondary"))


def test_a_failed_reply_has_a_prominent_retry(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice), shared_session.id)
    send(page, words(600))
    reply = assistant(page, 0)
    expect(reply.locator(".message-body")).to_contain_text("w5 ", timeout=10_000)
    expect(page.get_by_role("button", name="Retry this reply")).to_have_count(0)  # still streaming
    page.get_by_role("button", name="Abort reply").click()
    expect(reply).to_have_attribute("data-status", "cancelled", timeout=5_000)
    retry = reply.get_by_role("button", name="Retry this reply")
    expect(retry).to_have_class(re.compile("primary"))
    retry.click()
    expect(assistant(page)).to_have_attribute("data-status", "completed", timeout=STREAM)
    expect(assistant(page).locator(".part-text")).to_have_text(words(600))
    expect(reply).to_have_class(re.compile("message-superseded"))


def test_owner_invites_and_removes_a_member(browse: Any, alice: Any, bob: Any) -> None:
    from sessions_app import services

    session = services.create_session(alice, title="Alice alone", agent="echo")
    bob_page = browse(bob)
    expect(bob_page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(bob_page.locator(f'[data-session-id="{session.id}"]')).to_have_count(0)

    page = open_session(browse(alice), session.id)
    expect(page.locator("#members > li")).to_have_count(1)
    page.get_by_label("Username").fill("nobody-here")
    page.get_by_role("button", name="Invite").click()
    expect(page.locator("#invite-error")).to_contain_text("nobody-here")

    page.get_by_label("Username").fill("bob")
    page.get_by_label("Role").select_option("editor")
    page.get_by_role("button", name="Invite").click()
    member = page.locator('#members > li[data-username="bob"]')
    expect(member).to_contain_text("editor")
    # bob's list hears about it from his user-level stream.
    expect(bob_page.locator(f'[data-session-id="{session.id}"]')).to_contain_text("Alice alone", timeout=10_000)

    member.get_by_role("button", name="Remove bob").click()
    expect(member).to_have_count(0)
    expect(bob_page.locator(f'[data-session-id="{session.id}"]')).to_have_count(0, timeout=10_000)


def test_deleted_session_shows_a_notice(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page = open_session(browse(bob), shared_session.id)
    owner = browse(alice)
    owner.locator(f'[data-session-id="{shared_session.id}"]').get_by_role("button", name="Delete").click()
    owner.get_by_role("button", name="Delete session").click()
    notice = page.locator("#session-gone")
    expect(notice).to_be_visible(timeout=10_000)
    expect(notice).to_contain_text("deleted")
    expect(notice.get_by_role("link", name="Back to your sessions")).to_have_attribute("href", "/")
    expect(composer(page)).to_be_disabled()


def test_outsider_gets_the_404_page(browse: Any, charlie: Any, shared_session: Session) -> None:
    page = browse(charlie)
    expect(page.locator(f'[data-session-id="{shared_session.id}"]')).to_have_count(0)
    response = page.goto(f"/s/{shared_session.id}/")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.locator("body")).not_to_contain_text(shared_session.title)


def test_expired_login_goes_to_the_login_page_and_back(browse: Any, live: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice), shared_session.id)
    page.context.clear_cookies()
    send(page, "are you still there?")
    expect(page).to_have_url(re.compile(rf"/accounts/login/\?next=(/|%2F)s(/|%2F){shared_session.id}(/|%2F)$"), timeout=10_000)
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live.url}/s/{shared_session.id}/")
    open_session(page, shared_session.id)
    send(page, "back again")
    wait_reply(page, "back again")


def test_keyboard_only_and_phone_width(browse: Any, alice: Any, shared_session: Session) -> None:
    page = browse(alice, viewport={"width": 375, "height": 740})
    assert no_horizontal_scroll(page)
    # The skip link is the first stop and lands in the main landmark.
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()

    open_session(page, shared_session.id)
    assert no_horizontal_scroll(page)
    composer(page).focus()
    page.keyboard.type("typed with the keyboard only")
    page.keyboard.press("Enter")
    wait_reply(page, "typed with the keyboard only")
    send(page, "```\n" + "x" * 300 + "\n```")  # a long code line scrolls inside its block
    expect(assistant(page)).to_have_attribute("data-status", "completed", timeout=STREAM)
    assert no_horizontal_scroll(page)
    # The panels stack: the members panel (folded) sits above the conversation, as wide.
    panel = page.locator("#members-panel")
    members_box = panel.bounding_box()
    conversation_box = page.locator(".conversation").bounding_box()
    assert members_box and conversation_box
    assert members_box["y"] + members_box["height"] <= conversation_box["y"] + 1
    assert abs(members_box["width"] - conversation_box["width"]) < 8
    expect(panel).not_to_have_attribute("open", "")
    # The composer is on screen without scrolling the page.
    box = page.get_by_role("button", name="Send", exact=True).bounding_box()
    assert box and box["y"] + box["height"] <= 740
    panel.locator("summary").focus()
    page.keyboard.press("Enter")
    expect(panel.locator("#members > li")).to_have_count(3)
    assert no_horizontal_scroll(page)


def test_screenshots_of_the_pages(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    """Saves test-artifacts/ui-sessions.png and ui-session.png for people to look at."""
    from sessions_app import services

    ARTIFACTS.mkdir(exist_ok=True)
    services.create_session(alice, title="Draft the onboarding email", agent="openai")
    services.create_session(bob, title="Bob's research notes", agent="echo")
    services.add_member(Session.objects.get(title="Bob's research notes"), username="alice", role="viewer")
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")

    page = browse(alice, viewport={"width": 1280, "height": 800})
    expect(page.locator(".session-item")).to_have_count(3)
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    page.screenshot(path=str(ARTIFACTS / "ui-sessions.png"), full_page=True)

    page_b = open_session(browse(bob), shared_session.id)
    page.set_viewport_size({"width": 1280, "height": 960})
    open_session(page, shared_session.id)
    send(page, "Can you check the **login** flow?\n\n- session cookie\n- `next` parameter\n\n```python\nlogin(request, user)\n```")
    expect(assistant(page)).to_have_attribute("data-status", "completed", timeout=STREAM)
    composer(page_b).press_sequentially("!calc 2*(3+4)")
    composer(page_b).press("Enter")
    expect(assistant(page).locator(".approval")).to_be_visible(timeout=10_000)
    expect(page.locator("#presence > li")).to_have_count(2)
    # The conversation follows its end: the streaming reply and its tool card are in view.
    expect(assistant(page).locator(".tool-card")).to_be_in_viewport()
    expect(assistant(page)).to_have_attribute("data-status", "streaming")
    page.screenshot(path=str(ARTIFACTS / "ui-session.png"), full_page=True)
    page_b.set_viewport_size({"width": 375, "height": 740})
    expect(assistant(page_b).locator(".approval")).to_be_visible()
    page_b.screenshot(path=str(ARTIFACTS / "ui-session-phone.png"), full_page=True)
    page.get_by_role("button", name="Approve running calculator").click()
    wait_reply(page, "2*(3+4) = 14")


def test_without_websocket_the_page_falls_back_to_sse(browse: Any, alice: Any, shared_session: Session) -> None:
    page = browse(alice)
    # A proxy that refuses WebSocket: every handshake fails.
    page.route_web_socket(re.compile(r"/ws/"), lambda ws: ws.close(code=1011, reason="blocked"))
    page.goto(f"/s/{shared_session.id}/")
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-transport", "sse", timeout=20_000)
    expect(connection).to_have_attribute("data-state", LIVE, timeout=15_000)
    composer(page).press_sequentially("still works ")  # typing is not sent, and nothing breaks
    page.keyboard.insert_text(words(20))
    composer(page).press("Enter")
    wait_reply(page, "still works " + words(20))
