"""The shell around the conversation (issue 14): the sessions sidebar, dark mode, the list's
order, and the page defects of the workspace. Real Chromium, real daphne, alice (owner),
bob (editor) and charlie (outsider) side by side, desktop (1280×800) and phone (390×844).

The main states are saved to ``test-artifacts/screenshots/`` (``save_screenshot``) on every
run, for reviewers."""
# ruff: noqa: F811 (every test takes the imported ``browse`` fixture as a parameter)
from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from sessions_app import services
from sessions_app.models import Session
from tests.browser import save_screenshot
from tests.conftest import token_for
from tests.test_browser_ui import (  # noqa: F401 (browse: the harness's, checked for page errors)
    LIVE,
    STREAM,
    api_post,
    browse,
    composer,
    no_horizontal_scroll,
    open_session,
    send,
    wait_reply,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True, "device_scale_factor": 2}


def post(live: Any, user: Any, session: Session, text: str) -> None:
    response = api_post(live, user, f"/api/sessions/{session.id}/messages/", {"parts": [{"type": "text", "text": text}]})
    assert response.status_code == 202, response.text


def second_session(alice: Any, title: str = "Plan the release") -> Session:
    session = services.create_session(alice, title=title, agent="echo")
    services.add_member(session, username="bob", role="editor")
    session.refresh_from_db()
    return session


def sidebar_item(page: Any, session: Session) -> Any:
    return page.locator(f'#sidebar-list [data-session-id="{session.id}"]')


def sidebar_ids(page: Any) -> list[str]:
    return list(page.locator("#sidebar-list > li").evaluate_all("items => items.map(i => i.dataset.sessionId)"))


# ---------------------------------------------------------------- the sessions sidebar


def test_sidebar_switches_sessions_and_shows_status_and_unread_live(
    browse: Any, live: Any, alice: Any, bob: Any, charlie: Any, shared_session: Session
) -> None:
    other = second_session(alice)
    services.create_session(charlie, title="Charlie's secret", agent="echo")
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    sidebar = page.get_by_role("navigation", name="Sessions")
    expect(sidebar).to_be_visible()
    expect(page.locator("#sidebar-list").get_by_role("link")).to_have_count(2)  # nothing of charlie's
    current = sidebar_item(page, shared_session)
    expect(current.get_by_role("link")).to_have_attribute("aria-current", "page")
    expect(current).to_contain_text("Fix the login bug")
    expect(current.locator(".sidebar-status")).to_have_text("idle")
    expect(sidebar_item(page, other)).to_have_attribute("data-unread", "false")
    expect(page.locator("#sidebar-toggle")).to_have_attribute("aria-expanded", "true")

    # bob writes in the other session: it goes to the top, runs, and is unread for alice.
    ids_before = sidebar_ids(page)
    post(live, bob, other, "are we shipping on friday? " + " ".join(f"w{i}" for i in range(60)))
    item = sidebar_item(page, other)
    expect(item.locator(".sidebar-status")).to_have_text("busy", timeout=10_000)
    expect(item).to_have_attribute("data-unread", "true")
    expect(item.locator(".unread-marker")).to_have_text("new messages")
    expect(page.locator("#sidebar-toggle-count")).to_have_text("1")
    assert sidebar_ids(page)[0] == other.id, ids_before
    expect(item.locator(".sidebar-status")).to_have_text("idle", timeout=STREAM)

    # Activity in the open session marks nothing unread there.
    send(page, "a note of my own")
    wait_reply(page, "a note of my own")
    expect(current).to_have_attribute("data-unread", "false")
    expect(page.locator("#sidebar-list > li").first).to_have_attribute("data-session-id", shared_session.id)
    save_screenshot(page, "session-with-sidebar-desktop")

    # Switching is a link in the sidebar: the other session opens, now read.
    item.get_by_role("link").click()
    page.wait_for_url(f"**/s/{other.id}/")
    expect(page.locator("#session-title")).to_have_text("Plan the release")
    expect(sidebar_item(page, other).get_by_role("link")).to_have_attribute("aria-current", "page")
    expect(sidebar_item(page, other)).to_have_attribute("data-unread", "false")
    expect(page.locator("#sidebar-toggle-count")).to_be_hidden()
    # ... and stays read when alice goes back to the first one.
    sidebar_item(page, shared_session).get_by_role("link").click()
    page.wait_for_url(f"**/s/{shared_session.id}/")
    expect(sidebar_item(page, other)).to_have_attribute("data-unread", "false")
    expect(sidebar_item(page, other).locator(".sidebar-status")).to_have_text("idle")


def test_sidebar_marks_a_session_waiting_for_approval(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    tools = second_session(alice, "Numbers")
    Session.objects.filter(pk=tools.pk).update(agent="tools")
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    item = sidebar_item(page, tools)
    expect(item).to_be_visible()
    post(live, bob, tools, "!calc 2*(3+4)")
    expect(item.locator(".sidebar-status")).to_have_text("waiting for approval", timeout=10_000)
    expect(item).to_have_attribute("data-status", "waiting")
    save_screenshot(page, "sidebar-waiting-for-approval")

    # A page opened while the request is pending shows it too (read over REST, not only live).
    late = open_session(browse(bob, **DESKTOP), shared_session.id)
    expect(sidebar_item(late, tools).locator(".sidebar-status")).to_have_text("waiting for approval")

    pending = httpx.get(f"{live.url}/api/sessions/{tools.id}/permissions/?status=pending",
                        headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=10).json()
    response = api_post(live, bob, f"/api/sessions/{tools.id}/permissions/{pending[0]['id']}/", {"approved": True})
    assert response.status_code == 200, response.text
    for p in (page, late):
        expect(sidebar_item(p, tools).locator(".sidebar-status")).to_have_text("idle", timeout=STREAM)


def test_sidebar_folds_away_on_desktop_and_stays_folded(browse: Any, alice: Any, shared_session: Session) -> None:
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    sidebar = page.locator("#sessions-sidebar")
    expect(sidebar).to_be_visible()
    width_with = page.locator("#session-app").bounding_box()["width"]
    page.locator("#sidebar-toggle").click()
    expect(sidebar).to_be_hidden()
    expect(page.locator("#sidebar-toggle")).to_have_attribute("aria-expanded", "false")
    assert page.locator("#session-app").bounding_box()["width"] > width_with + 100
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(sidebar).to_be_hidden()
    page.locator("#sidebar-toggle").click()
    expect(sidebar).to_be_visible()


def test_sidebar_is_a_drawer_on_a_phone(browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    other = second_session(alice)
    page = open_session(browse(bob, **PHONE), shared_session.id)
    sidebar = page.locator("#sessions-sidebar")
    toggle = page.get_by_role("button", name=re.compile("^Sessions"))
    # Folded: the conversation gets the screen.
    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    assert no_horizontal_scroll(page)
    expect(composer(page)).to_be_in_viewport()

    post(live, alice, other, "news for bob")
    expect(page.locator("#sidebar-toggle-count")).to_have_text("1", timeout=10_000)
    save_screenshot(page, "session-phone")

    toggle.tap()
    expect(sidebar).to_be_visible()
    expect(page.locator("#sidebar-scrim")).to_be_visible()
    box = sidebar.bounding_box()
    assert box["x"] == 0 and box["width"] <= 390
    expect(sidebar_item(page, shared_session).get_by_role("link")).to_be_focused()
    expect(sidebar_item(page, other)).to_have_attribute("data-unread", "true")
    # The drawer's two controls are one finger-sized row.
    new_box = sidebar.get_by_role("link", name="+ New session").bounding_box()
    close_box = page.get_by_role("button", name="Close the sessions list").bounding_box()
    assert abs(new_box["height"] - close_box["height"]) < 1 and close_box["height"] >= 38
    assert abs((new_box["y"] + new_box["height"] / 2) - (close_box["y"] + close_box["height"] / 2)) < 1
    save_screenshot(page, "sidebar-phone-open")
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_focused()

    toggle.tap()
    page.get_by_role("button", name="Close the sessions list").tap()
    expect(sidebar).to_be_hidden()
    toggle.tap()
    sidebar_item(page, other).get_by_role("link").tap()
    page.wait_for_url(f"**/s/{other.id}/")
    expect(page.locator("#session-title")).to_have_text("Plan the release")
    expect(page.locator("#sessions-sidebar")).to_be_hidden()  # a new page on a phone starts folded
    assert no_horizontal_scroll(page)


# ---------------------------------------------------------------- dark mode


THEME_AT_BODY = """
window.__themeAtBody = null;
new MutationObserver((_, observer) => {
  if (document.body) {
    window.__themeAtBody = document.documentElement.getAttribute("data-theme");
    observer.disconnect();
  }
}).observe(document, {childList: true, subtree: true});
"""


def background(page: Any, selector: str = "body") -> str:
    return str(page.locator(selector).first.evaluate("n => getComputedStyle(n).backgroundColor"))


def test_dark_mode_follows_the_system_before_the_first_paint(browse: Any, alice: Any, shared_session: Session) -> None:
    page = browse(alice, color_scheme="dark", **DESKTOP)
    page.add_init_script(THEME_AT_BODY)
    page.reload()
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    # Set before <body> existed, so nothing was ever painted in the light colours.
    assert page.evaluate("window.__themeAtBody") == "dark"
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    assert background(page) == "rgb(15, 19, 23)"
    assert background(page, ".session-item") == "rgb(23, 28, 34)"
    save_screenshot(page, "sessions-list-dark")

    open_session(page, shared_session.id)
    send(page, "reading in the **dark**")
    wait_reply(page, "reading in the dark")
    assert page.evaluate("window.__themeAtBody") == "dark"
    assert background(page, ".sidebar") == "rgb(23, 28, 34)"
    assert background(page, ".message") != "rgb(255, 255, 255)"
    save_screenshot(page, "session-dark-desktop")

    # The system turns light: so does the page, live.
    page.emulate_media(color_scheme="light")
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    assert background(page) == "rgb(245, 246, 248)"


def test_theme_toggle_is_remembered_and_shared_by_tabs(browse: Any, alice: Any, shared_session: Session) -> None:
    page = browse(alice, color_scheme="light", **DESKTOP)
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    menu = page.locator("#account-menu")
    menu.locator("summary").click()
    expect(page.get_by_role("radio", name="System")).to_be_checked()
    page.get_by_role("radio", name="Dark").check()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(page.locator("html")).to_have_attribute("data-theme-choice", "dark")

    other_tab = page.context.new_page()
    other_tab.add_init_script(THEME_AT_BODY)
    other_tab.goto(f"/s/{shared_session.id}/")
    assert other_tab.evaluate("window.__themeAtBody") == "dark"  # remembered, no flash
    expect(other_tab.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)

    # The choice made in one tab changes the other at once.
    page.get_by_role("radio", name="Light").check()
    expect(other_tab.locator("html")).to_have_attribute("data-theme", "light")
    page.get_by_role("radio", name="System").check()
    other_tab.emulate_media(color_scheme="dark")
    expect(other_tab.locator("html")).to_have_attribute("data-theme", "dark")
    other_tab.close()


def test_dark_mode_on_a_phone(browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page = open_session(browse(bob, color_scheme="dark", **PHONE), shared_session.id)
    post(live, alice, shared_session, "hello **bob**, in the dark")
    wait_reply(page, "hello bob, in the dark")
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    assert no_horizontal_scroll(page)
    save_screenshot(page, "session-dark-phone")
    page.get_by_role("button", name=re.compile("^Sessions")).tap()
    expect(page.locator("#sessions-sidebar")).to_be_visible()
    assert background(page, "#sessions-sidebar") == "rgb(23, 28, 34)"
    save_screenshot(page, "sidebar-phone-dark")

    page.goto("/")
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    assert no_horizontal_scroll(page)
    # The search box is a themed field like the others, not the browser's grey one.
    assert background(page, "#search-input") == background(page, "#new-title") == "rgb(23, 28, 34)"
    save_screenshot(page, "sessions-list-dark-phone")


def test_the_login_page_themes_too(browse: Any) -> None:
    page = browse(None, color_scheme="dark", **DESKTOP)
    page.goto("/accounts/login/")
    assert background(page, ".card") == "rgb(23, 28, 34)"
    save_screenshot(page, "login-dark")


# ---------------------------------------------------------------- the sessions list


def test_creating_a_session_opens_it_named_untitled_until_it_has_a_title(browse: Any, live: Any, alice: Any) -> None:
    page = browse(alice, **DESKTOP)
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    page.get_by_role("button", name="Create session").click()
    page.wait_for_url(re.compile(r"/s/[^/]+/$"))
    session_id = page.url.rstrip("/").rsplit("/", 1)[1]
    expect(page.locator("#session-title")).to_have_text("Untitled session")
    expect(page).to_have_title("Untitled session · Tandem")
    expect(page.locator("#session-title")).not_to_contain_text(session_id)
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(page.locator(f'#sidebar-list [data-session-id="{session_id}"]')).to_contain_text("Untitled session")

    # The first message gives it its automatic title, everywhere on the page.
    send(page, "Budget for the offsite")
    wait_reply(page, "Budget for the offsite")
    title = Session.objects.get(pk=session_id).title
    assert title and title != session_id
    expect(page.locator("#session-title")).to_have_text(title)
    expect(page).to_have_title(f"{title} · Tandem")
    expect(page.locator(f'#sidebar-list [data-session-id="{session_id}"] .sidebar-title')).to_have_text(title)


def test_the_list_puts_the_most_recent_activity_first_live(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    newer = second_session(alice)  # created last: first in the list
    page = browse(alice, **DESKTOP)
    expect(page.locator("#list-connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    items = page.locator("#session-list > li")
    expect(items).to_have_count(2)
    expect(items.first).to_have_attribute("data-session-id", newer.id)
    # Keyboard focus on the other item survives the move.
    page.locator(f'#session-list [data-session-id="{newer.id}"] a').focus()

    post(live, bob, shared_session, "activity in the older one")
    expect(items.first).to_have_attribute("data-session-id", shared_session.id, timeout=10_000)
    expect(items.first.locator(".updated")).to_have_text("just now")
    expect(page.locator(f'#session-list [data-session-id="{newer.id}"] a')).to_be_focused()
    # bob's message is news for alice; her own session without activity is not.
    expect(items.first.locator(".unread-marker")).to_have_text("new messages")
    expect(page.locator(f'#session-list [data-session-id="{newer.id}"]')).to_have_attribute("data-unread", "false")
    save_screenshot(page, "sessions-list")

    # The server's order agrees after a reload, and the news is still news.
    page.reload()
    expect(items.first).to_have_attribute("data-session-id", shared_session.id)
    expect(items.first).to_have_attribute("data-unread", "true")

    # Read in another tab: no longer news here, at once.
    tab = page.context.new_page()
    open_session(tab, shared_session.id)
    expect(items.first).to_have_attribute("data-unread", "false", timeout=10_000)
    tab.close()
    page.reload()
    expect(items.first).to_have_attribute("data-unread", "false")


# ---------------------------------------------------------------- members


def test_an_invite_error_goes_once_it_is_no_longer_true(browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    page = open_session(browse(alice, **DESKTOP), shared_session.id)
    error = page.locator("#invite-error")
    page.get_by_label("Username").fill("bob")
    page.get_by_role("button", name="Invite").click()
    expect(error).to_have_text("bob is already a member.")

    # bob is removed (here by another of alice's clients): the message is no longer true.
    response = httpx.delete(f"{live.url}/api/sessions/{shared_session.id}/members/bob/",
                            headers={"Authorization": f"Bearer {token_for(alice)}"}, timeout=10)
    assert response.status_code == 204
    expect(page.locator('#members [data-username="bob"]')).to_have_count(0, timeout=10_000)
    expect(error).to_be_hidden()

    # Editing the name also takes an old message away.
    page.get_by_label("Username").fill("nobody-by-this-name")
    page.get_by_role("button", name="Invite").click()
    expect(error).to_have_text("There is no user called “nobody-by-this-name”.")
    page.get_by_label("Username").press("Backspace")
    expect(error).to_be_hidden()


def test_a_removed_member_sees_she_lost_access(browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session) -> None:
    owner = open_session(browse(alice, **DESKTOP), shared_session.id)
    page = open_session(browse(bob, **DESKTOP), shared_session.id)
    expect(page.locator('#members [data-username="bob"] .role-pill')).to_have_text("editor")

    owner.get_by_role("button", name="Remove bob").click()
    expect(page.locator("#session-gone")).to_be_visible(timeout=10_000)
    expect(page.locator("#session-gone")).to_contain_text("removed")
    members = page.locator("#members")
    expect(members.locator('[data-username="bob"]')).to_have_count(0)
    expect(members.locator('[data-username="alice"]')).to_have_count(0)
    expect(members).to_contain_text("removed")
    expect(page.locator("#members-count")).to_have_text("")
    expect(page.locator("#session-role")).to_have_text("no longer a member")
    expect(composer(page)).to_be_disabled()
    # The sidebar lets her go on to her other sessions; this one has left it.
    expect(sidebar_item(page, shared_session)).to_have_count(0, timeout=10_000)
    save_screenshot(page, "removed-member")


# ---------------------------------------------------------------- pages


def test_unknown_page_and_logout_link_in_the_browser(browse: Any, alice: Any) -> None:
    page = browse(alice, **DESKTOP)
    response = page.goto("/no/such/page/")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.locator("body")).not_to_contain_text("URLconf")

    page.goto("/accounts/logout/")
    expect(page.get_by_role("heading", name="Log out of Tandem?")).to_be_visible()
    page.locator("main").get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))


def test_password_pages_are_reached_from_the_menu_and_the_login_page(browse: Any, alice: Any) -> None:
    page = browse(alice, **DESKTOP)
    page.locator("#account-menu summary").click()
    page.get_by_role("link", name="Change password").click()
    expect(page.get_by_role("heading", name="Change your password")).to_be_visible()
    expect(page.locator("link[rel=stylesheet]")).to_have_attribute("href", re.compile("tandem.css"))
    save_screenshot(page, "password-change")

    anonymous = browse(None, **DESKTOP)
    anonymous.goto("/accounts/login/")
    anonymous.get_by_role("link", name="Forgot your password?").click()
    expect(anonymous.get_by_role("heading", name="Forgot your password?")).to_be_visible()
    icon = anonymous.locator("link[rel=icon]")
    expect(icon).to_have_attribute("href", "/static/img/favicon.svg")


def test_on_the_quick_start_a_forgotten_password_is_reset_from_the_servers_output(
    browse: Any, live: Any, alice: Any
) -> None:
    # The account an administrator made with an address; the server runs with the quick
    # start's settings, which print the email instead of sending it.
    alice.email = "alice@example.test"
    alice.save(update_fields=["email"])
    page = browse(None, **PHONE)
    page.goto("/accounts/login/")
    page.get_by_role("link", name="Forgot your password?").tap()
    page.get_by_label("Email").fill("alice@example.test")
    page.get_by_role("button", name="Send the link").tap()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    link = re.search(r"http://\S+/accounts/reset/\S+/", live.log())
    assert link, live.log()
    assert link.group(0).startswith(live.url)
    page.goto(link.group(0))
    expect(page.get_by_role("heading", name="Set a new password")).to_be_visible()
    assert no_horizontal_scroll(page)
    save_screenshot(page, "password-reset-phone")
    new = "amber-willow-compass-58"
    page.get_by_label("New password", exact=True).fill(new)
    page.get_by_label("New password confirmation").fill(new)
    page.get_by_role("button", name="Set password").tap()
    expect(page.get_by_role("heading", name="Your new password is set")).to_be_visible()
    alice.refresh_from_db()
    assert alice.check_password(new)
    # The server's log lines (the access log) never show the link's token.
    token = link.group(0).rstrip("/").rsplit("/", 1)[1]
    assert live.log().count(token) == 1  # once: in the printed email, nowhere else
    assert re.search(r"GET /accounts/reset/[\w-]+/\[redacted\]/", live.log()), live.log()
