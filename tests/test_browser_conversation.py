"""The conversation in the browser (issue 14): approvals inline on the tool card, the
composer on phones and desktops, paging back through long histories, reading aids (code
highlighting and copy, dates, the "new messages" pill), command hints, Esc, and what
screen readers and background tabs are told.

alice owns the session, bob edits, carol views. Real Chromium, real daphne; every wait is
a bounded Playwright expectation. Screenshots of the main states go to
test-artifacts/screenshots/ (tests.browser.save_screenshot)."""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from sessions_app.models import Message, Part, Session
from tests.browser import save_screenshot
from tests.test_browser_ui import (
    STREAM,
    api_post,
    assistant,
    composer,
    open_session,
    send,
    user_messages,
    wait_reply,
    words,
)

# The fixture that also checks no page threw an uncaught error.
from tests.test_browser_ui import browse as browse

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True, "device_scale_factor": 2}


def use_tools(session: Session) -> None:
    Session.objects.filter(pk=session.pk).update(agent="tools")


def history(session: Session, author: Any, n: int, *, start: Any = None, step: timedelta = timedelta(seconds=1)) -> list[str]:
    """n ended user messages with one text part each ("message 1" …), oldest first."""
    start = start or timezone.now() - timedelta(hours=2)
    made = []
    for i in range(n):
        at = start + step * i
        made.append(Message(session=session, role="user", author=author, status="completed",
                            created_at=at, turn_at=at, completed_at=at))
    Message.objects.bulk_create(made)
    Part.objects.bulk_create([Part(message=m, index=0, type="text", text=f"message {i + 1}") for i, m in enumerate(made)])
    return [m.pk for m in made]


def approval(page: Any) -> Any:
    return assistant(page).locator(".tool-card .approval")


# ---------------------------------------------------------------- approvals (defect 3)


def test_a_permission_request_takes_no_focus_and_loses_no_keystrokes(
    browse: Any, alice: Any, bob: Any, carol: Any, shared_session: Session
) -> None:
    use_tools(shared_session)
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **PHONE), shared_session.id)
    page_c = open_session(browse(carol, **DESKTOP), shared_session.id)
    composer(page_a).click()
    page_a.keyboard.type("I am typing a long thought ")

    composer(page_b).fill("!calc 2*(3+4)")
    page_b.get_by_role("button", name="Send", exact=True).tap()
    for page in (page_a, page_b, page_c):
        expect(approval(page)).to_be_visible(timeout=10_000)
        expect(assistant(page).locator(".tool-card")).to_have_attribute("data-status", "pending")
        expect(assistant(page).locator(".tool-card")).to_contain_text('"expression": "2*(3+4)"')
        expect(page.get_by_role("dialog")).to_have_count(0)  # nothing modal, for anyone
    # alice goes on typing: her keystrokes still land in the composer.
    expect(composer(page_a)).to_be_focused()
    page_a.keyboard.type("and finish it.")
    expect(composer(page_a)).to_have_value("I am typing a long thought and finish it.")
    # Editors see that it waits for them, with the buttons; the viewer sees it, without.
    for page in (page_a, page_b):
        expect(approval(page)).to_contain_text("Waiting for your approval")
        expect(approval(page).get_by_role("button", name="Approve running calculator")).to_be_visible()
        expect(page.locator("#pending-permissions")).to_contain_text("Waiting for your approval")
    expect(approval(page_c)).to_contain_text("Waiting for an editor's approval")
    expect(approval(page_c).get_by_role("button")).to_have_count(0)
    save_screenshot(page_a, "conversation-approval-desktop")
    save_screenshot(page_b, "conversation-approval-phone")
    save_screenshot(page_c, "conversation-approval-viewer")

    approval(page_b).get_by_label("Reason (optional)").fill("fine by me")
    approval(page_b).get_by_role("button", name="Approve running calculator").tap()
    for page in (page_a, page_b, page_c):
        reply = wait_reply(page, "2*(3+4) = 14")
        card = reply.locator(".tool-card")
        expect(card).to_have_attribute("data-status", "completed")
        expect(card.locator(".approval")).to_have_count(0)
        expect(page.locator("#pending-permissions")).to_be_hidden()
    expect(assistant(page_a).locator(".approval-result")).to_have_text("bob approved running calculator (“fine by me”).")
    expect(page_a.locator("#page-notice")).to_contain_text("bob approved running calculator")
    expect(composer(page_a)).to_be_focused()
    expect(composer(page_a)).to_have_value("I am typing a long thought and finish it.")


def test_a_late_answer_is_told_who_answered_first(browse: Any, alice: Any, bob: Any, live: Any, shared_session: Session) -> None:
    use_tools(shared_session)
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    send(page, "!calc 1+1")
    expect(approval(page)).to_be_visible(timeout=10_000)
    permission_id = approval(page).get_attribute("data-permission-id")

    def bob_answers_first(route: Any) -> None:
        # alice's click is on its way: bob's answer gets there first.
        response = api_post(live, bob, f"/api/sessions/{shared_session.id}/permissions/{permission_id}/",
                            {"approved": False, "reason": "not now"})
        assert response.status_code == 200, response.text
        route.continue_()

    page.route(f"**/api/sessions/{shared_session.id}/permissions/{permission_id}/", bob_answers_first)
    approval(page).get_by_role("button", name="Approve running calculator").click()
    expect(page.locator("#page-notice")).to_contain_text("bob rejected running calculator")
    wait_reply(page, re.compile("I did not run the calculator"))
    card = assistant(page).locator(".tool-card")
    expect(card).to_have_attribute("data-status", "error")
    expect(card.locator(".approval")).to_have_count(0)
    expect(card.locator(".approval-result")).to_contain_text("bob rejected running calculator")


def test_a_request_waits_in_the_tab_title_and_notifies_only_once_allowed(
    browse: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    use_tools(shared_session)
    page = browse(alice, **DESKTOP)
    # A stand-in for the browser's Notification (headless Chromium shows none), and a tab
    # that can be sent to the background.
    page.add_init_script("""
      window.__asked = 0; window.__shown = [];
      class FakeNotification {
        constructor(title, options) { window.__shown.push({ title, body: options && options.body }); }
        close() {}
      }
      FakeNotification.permission = "default";
      FakeNotification.requestPermission = async () => { window.__asked += 1; FakeNotification.permission = "granted"; return "granted"; };
      window.Notification = FakeNotification;
      window.__hidden = false;
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => (window.__hidden ? "hidden" : "visible") });
      Object.defineProperty(document, "hidden", { configurable: true, get: () => window.__hidden });
      window.__setHidden = (h) => { window.__hidden = h; document.dispatchEvent(new Event("visibilitychange")); };
    """)
    open_session(page, shared_session.id)
    page_b = open_session(browse(bob, **DESKTOP), shared_session.id)
    title = page.title()
    assert page.evaluate("window.__asked") == 0  # never asked on load
    enable = page.get_by_role("button", name="Enable notifications")
    expect(enable).to_be_visible()
    enable.click()
    expect(enable).to_be_hidden()
    assert page.evaluate("window.__asked") == 1

    page.evaluate("window.__setHidden(true)")
    send(page_b, "!calc 6*7")
    expect(page).to_have_title(re.compile(r"^\(\d+\) ⏳ " + re.escape(title)), timeout=10_000)
    page.wait_for_function("window.__shown.some(n => n.title.startsWith('Approval needed'))")
    assert "calculator" in page.evaluate("window.__shown.find(n => n.title.startsWith('Approval needed')).body")
    # A sound-free cue on the card itself.
    expect(assistant(page).locator(".tool-card")).to_have_class(re.compile(r"\bawaiting\b"))
    page.evaluate("window.__setHidden(false)")
    expect(page).to_have_title(title)


# ---------------------------------------------------------------- defect 5


def test_aborting_while_a_permission_waits_says_cancelled_not_rejected(
    browse: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    use_tools(shared_session)
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **DESKTOP), shared_session.id)
    send(page_a, "!calc 1+2")
    expect(approval(page_a)).to_be_visible(timeout=10_000)
    page_a.get_by_role("button", name="Abort reply").click()
    for page in (page_a, page_b):
        expect(assistant(page)).to_have_attribute("data-status", "cancelled", timeout=10_000)
        expect(page.locator("#pending-permissions")).to_be_hidden()
        result = assistant(page).locator(".approval-result")
        expect(result).to_have_text("The request to run calculator was cancelled: the reply was stopped.")
        expect(page.locator("#page-notice")).not_to_contain_text("rejected")
    save_screenshot(page_a, "conversation-aborted-request")


def test_a_network_error_goes_away_once_the_server_answers_again(
    browse: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **DESKTOP), shared_session.id)
    post = f"**/api/sessions/{shared_session.id}/messages/"
    page_a.route(post, lambda route: route.abort() if route.request.method == "POST" else route.continue_())
    send(page_a, "this will not leave")
    error = page_a.locator("#composer-error")
    expect(error).to_contain_text("Network error")
    page_a.unroute(post)
    # The server is reachable again: the next event proves it, and the error goes.
    send(page_b, "hello from bob")
    expect(user_messages(page_a).last).to_contain_text("hello from bob", timeout=10_000)
    expect(error).to_be_hidden()
    # A mistake of the writer's own stays until they fix it.
    composer(page_a).fill("   ")
    composer(page_a).press("Enter")
    expect(error).to_have_text("Write a message before sending.")
    send(page_b, "again")
    expect(user_messages(page_a).last).to_contain_text("again", timeout=10_000)
    expect(error).to_have_text("Write a message before sending.")


# ---------------------------------------------------------------- the composer (defect 4)


def test_on_a_phone_enter_is_a_new_line_and_send_sends(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice, **PHONE), shared_session.id)
    box = composer(page)
    box.tap()
    before = box.bounding_box()
    page.keyboard.type("first line")
    page.keyboard.press("Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Enter")
    page.keyboard.type("third line")
    expect(box).to_have_value("first line\nsecond line\nthird line")
    expect(user_messages(page)).to_have_count(0)
    after = box.bounding_box()
    assert before and after and after["height"] > before["height"]  # it grew with the text
    expect(page.locator("#composer-hint")).to_have_text("Enter starts a new line; tap Send to send.")
    expect(box).to_have_attribute("placeholder", "Enter starts a new line; tap Send to send")
    save_screenshot(page, "conversation-composer-phone")
    send_button = page.get_by_role("button", name="Send", exact=True)
    expect(send_button).to_be_in_viewport()
    send_button.tap()
    expect(user_messages(page).last.locator(".message-body")).to_have_text("first line\nsecond line\nthird line", timeout=10_000)
    expect(box).to_have_value("")


def test_on_a_desktop_enter_sends_and_shift_enter_is_a_new_line(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    expect(composer(page)).to_be_focused()  # ready to write on opening
    page.keyboard.type("one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("two")
    expect(composer(page)).to_have_value("one\ntwo")
    page.keyboard.press("Enter")
    expect(user_messages(page).last.locator(".message-body")).to_have_text("one\ntwo", timeout=10_000)
    expect(user_messages(page)).to_have_count(1)
    expect(composer(page)).to_have_value("")


def test_command_hints_complete_the_agents_commands(browse: Any, alice: Any, shared_session: Session) -> None:
    use_tools(shared_session)
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    box = composer(page)
    expect(box).to_be_focused()
    page.keyboard.type("!")
    hints = page.get_by_role("listbox", name="Agent commands")
    expect(hints).to_be_visible()
    expect(hints.get_by_role("option")).to_have_count(4)
    expect(hints).to_contain_text("!calc <expression>")
    expect(hints).to_contain_text("!time")
    expect(hints).to_contain_text("!doc append <text>")
    expect(hints).to_contain_text("!mcp <server>.<tool> <json>")
    save_screenshot(page, "conversation-command-hints")
    page.keyboard.type("ti")
    expect(hints.get_by_role("option")).to_have_count(1)
    page.keyboard.press("Enter")  # completes, does not send
    expect(box).to_have_value("!time")
    expect(hints).to_be_hidden()
    expect(user_messages(page)).to_have_count(0)
    page.keyboard.press("Enter")
    wait_reply(page, re.compile(r"^The server time is "))
    # Escape closes the hints without touching anything else.
    page.keyboard.type("!c")
    expect(hints.get_by_role("option")).to_have_count(1)
    page.keyboard.press("Escape")
    expect(hints).to_be_hidden()
    expect(box).to_have_value("!c")


def test_escape_stops_the_reply(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    send(page, words(600))
    reply = assistant(page)
    expect(reply.locator(".message-body")).to_contain_text("w10 ", timeout=10_000)
    page.keyboard.press("Escape")
    expect(reply).to_have_attribute("data-status", "cancelled", timeout=10_000)
    expect(page.locator("#session-status")).to_have_text("idle", timeout=5_000)
    assert "w600" not in reply.locator(".message-body").inner_text()


# ---------------------------------------------------------------- history (defect 7)


def test_history_opens_on_its_latest_page_and_loads_older_on_demand(
    browse: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    history(shared_session, bob, 450)
    page = browse(alice, **DESKTOP)
    listed: list[str] = []
    page.on("request", lambda r: listed.append(r.url) if "/messages/" in r.url and r.method == "GET" else None)
    open_session(page, shared_session.id)
    items = page.locator("#messages > li.message")
    expect(items).to_have_count(200)
    expect(items.last).to_contain_text("message 450")
    expect(items.first).to_contain_text("message 251")
    assert len(listed) == 1 and "latest=true" in listed[0], listed  # one page, not the whole history
    older = page.get_by_role("button", name="Load older messages")
    expect(older).to_be_visible()
    save_screenshot(page, "conversation-load-older")
    older.click()
    expect(items).to_have_count(400)
    expect(items.first).to_contain_text("message 51")
    # What the reader looked at stayed in view: message 251 is still on screen.
    expect(page.locator("#messages > li.message", has_text=re.compile(r"^.*message 251$"))).to_be_in_viewport()
    # Scrolling to the top loads the rest.
    page.locator("#scroller").evaluate("s => { s.scrollTop = 0; }")
    expect(items).to_have_count(450)
    expect(items.first).to_contain_text("message 1")
    expect(older).to_be_hidden()
    texts = items.locator(".message-body").all_inner_texts()
    assert texts == [f"message {i}" for i in range(1, 451)]


def test_a_link_to_an_old_message_loads_back_to_it(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    made = history(shared_session, bob, 260)
    page = browse(alice, **DESKTOP)
    page.goto(f"/s/{shared_session.id}/#m-{made[9]}")
    target = page.locator(f"#m-{made[9]}")
    expect(target).to_be_in_viewport(timeout=15_000)
    expect(target).to_have_class(re.compile(r"\bmessage-target\b"))


# ---------------------------------------------------------------- reading


def test_code_blocks_are_highlighted_and_copied_and_so_are_messages(
    browse: Any, alice: Any, shared_session: Session
) -> None:
    page = browse(alice, **DESKTOP)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_session(page, shared_session.id)
    source = "Here:\n\n```python\ndef add(a, b):\n    return a + b  # sum\n```\n\nand `inline`."
    send(page, source)
    reply = assistant(page)
    expect(reply).to_have_attribute("data-status", "completed", timeout=STREAM)
    block = reply.locator(".code-wrap")
    expect(block.locator(".hljs-keyword").first).to_have_text("def")
    expect(block.locator(".hljs-comment")).to_have_text("# sum")
    expect(block.locator(".code-lang")).to_have_text("python")
    save_screenshot(page, "conversation-code-block")
    block.get_by_role("button", name="Copy python code").click()
    expect(block.get_by_role("button", name="Copy python code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "def add(a, b):\n    return a + b  # sum\n"
    reply.get_by_role("button", name="Copy this message (Agent)").click()
    assert page.evaluate("navigator.clipboard.readText()") == source


def test_dates_show_on_hover_and_separate_the_days(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    two_days_ago = timezone.now() - timedelta(days=2)
    history(shared_session, bob, 2, start=two_days_ago)
    history(shared_session, bob, 2, start=timezone.now() - timedelta(minutes=5))
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    items = page.locator("#messages > li.message")
    expect(items).to_have_count(4)
    labels = [items.nth(i).get_attribute("data-day-label") for i in range(4)]
    assert labels[0] and labels[1] is None and labels[2] == "Today" and labels[3] is None, labels
    assert str(two_days_ago.year) in labels[0]
    full = items.first.locator("time").get_attribute("title")
    assert full and str(two_days_ago.year) in full
    save_screenshot(page, "conversation-day-separators")


def test_new_messages_pill_when_scrolled_up(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    history(shared_session, bob, 60)
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **DESKTOP), shared_session.id)
    pill = page_a.get_by_role("button", name="New messages ↓")
    expect(pill).to_be_hidden()
    page_a.locator("#scroller").evaluate("s => { s.scrollTop = 0; }")
    page_a.locator("#scroller").dispatch_event("scroll")
    send(page_b, "look at this")
    expect(pill).to_be_visible(timeout=10_000)
    expect(page_a.locator("#messages > li.message").first).to_be_in_viewport()  # not pulled down
    save_screenshot(page_a, "conversation-new-messages-pill")
    pill.click()
    expect(pill).to_be_hidden()
    expect(user_messages(page_a).last).to_be_in_viewport()


def test_screen_readers_hear_new_messages_once(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    history(shared_session, bob, 3)
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **DESKTOP), shared_session.id)
    announcer = page_a.locator("#announcer")
    expect(announcer).to_have_attribute("aria-live", "polite")
    expect(announcer).to_have_text("")  # the history is not read out
    send(page_b, "can you hear me")
    expect(announcer).to_contain_text("bob: can you hear me", timeout=10_000)
    wait_reply(page_a, "can you hear me")
    expect(announcer).to_contain_text("Agent replied: can you hear me")
    assert announcer.inner_text().count("bob: can you hear me") == 1


def test_highlighted_code_stays_inert(browse: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page_a = open_session(browse(alice, **DESKTOP), shared_session.id)
    page_b = open_session(browse(bob, **PHONE), shared_session.id)
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    send(page_a, f"```html\n{payload}\n```\n\n```\n{payload}\n```")
    for page in (page_a, page_b):
        reply = assistant(page)
        expect(reply).to_have_attribute("data-status", "completed", timeout=STREAM)
        expect(reply.locator(".code-wrap")).to_have_count(2)
        expect(reply.locator(".code-wrap code").first).to_have_text(payload)
        expect(reply.locator(".code-wrap .hljs-tag").first).to_be_visible()  # highlighted as HTML
        assert reply.locator("img, script").count() == 0
        assert page.evaluate("window.__pwned") is None
    save_screenshot(page_b, "conversation-code-phone")
