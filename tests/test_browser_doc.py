"""The shared document's editor in real browsers (PROTOCOL §10): Chromium pages running
static/js/doc-panel.js (CodeMirror 6 + y-codemirror.next + the stock y-websocket
WebsocketProvider) against a real server process, with REST and a ``pycrdt`` client as
the other writers.

Every wait is a bounded Playwright expectation; nothing sleeps to make an assertion pass."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pycrdt
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect
from websockets.sync.client import connect as ws_connect

from events_app.models import Event
from sessions_app.models import Session
from tests.browser import save_screenshot
from tests.conftest import start_server, token_for, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WIDE = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 800}
SYNCED = 15_000  # ms: the longest a page may take to open its document

# The editor's text as the document holds it: the lines CodeMirror drew, without the
# other people's caret labels (y-codemirror.next draws them inside the text).
DOC_TEXT = """() => [...document.querySelectorAll('#doc-panel .cm-line')].map((line) => {
  const copy = line.cloneNode(true);
  copy.querySelectorAll('.cm-ySelectionCaret').forEach((node) => node.remove());
  return copy.textContent;
}).join('\\n')"""


@pytest.fixture
def server_env() -> dict[str, str]:
    """Settings for the test's server process; a test parametrizes it to change them."""
    return {}


@pytest.fixture
def live(servers: Any, server_env: dict[str, str]) -> Any:
    (server,) = servers(1, **{"TANDEM_ECHO_DELAY_MS": "15", **server_env})
    return server


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


def open_doc(browse: Callable[..., Any], user: Any, session_id: str, viewport: dict[str, int] = WIDE) -> Any:
    page = browse(user, viewport=viewport)
    page.goto(f"/s/{session_id}/")
    if viewport is PHONE:
        page.get_by_role("tab", name="Document").click()
    expect(page.locator("#doc-panel")).to_have_attribute("data-synced", "true", timeout=SYNCED)
    expect(page.locator("#doc-connection")).to_have_attribute("data-state", "live")
    return page


def doc_text(page: Any) -> str:
    return str(page.evaluate(DOC_TEXT))


def expect_doc_text(page: Any, text: str, timeout: float = 10_000) -> None:
    try:
        page.wait_for_function(f"(want) => ({DOC_TEXT})() === want", arg=text, timeout=timeout)
    except PlaywrightTimeout:
        assert doc_text(page) == text  # the diff says how it differs
        raise


def rest(live: Any, user: Any, method: str, body: dict[str, Any] | None = None, session_id: str = "") -> httpx.Response:
    return httpx.request(
        method, f"{live.url}/api/sessions/{session_id}/doc/", json=body,
        headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=10,
    )


def stored(live: Any, user: Any, session_id: str) -> dict[str, Any]:
    response = rest(live, user, "GET", session_id=session_id)
    assert response.status_code == 200, response.text
    return dict(response.json())


def insert_over_rest(live: Any, user: Any, session_id: str, at: int, text: str) -> dict[str, Any]:
    response = rest(live, user, "PATCH", {"edits": [{"at": at, "insert": text}]}, session_id=session_id)
    assert response.status_code == 200, response.text
    return dict(response.json())


def ticket_for(live: Any, user: Any) -> str:
    response = httpx.post(f"{live.url}/api/auth/ticket/", headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["ticket"])


# Types ``text`` into the page's editor one character every ``gap`` ms, from the wall-clock
# time ``start`` on, as keystrokes do (insertText at the cursor); records when it began and
# ended, so a test can show that two pages typed at the same time.
TYPE_AT = """([text, start, gap]) => {
  window.__typing = { done: false };
  const content = document.querySelector('#doc-panel .cm-content');
  const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  (async () => {
    await pause(Math.max(0, start - Date.now()));
    content.focus();
    window.__typing.began = Date.now();
    for (const ch of text) {
      document.execCommand('insertText', false, ch);
      await pause(gap);
    }
    window.__typing.ended = Date.now();
    window.__typing.done = true;
  })();
}"""


def typed_subsequence(text: str, alphabet: str) -> str:
    return "".join(ch for ch in text if ch in alphabet)


# ---------------------------------------------------------------- editing together


def test_two_people_typing_into_the_same_paragraph_at_once_converge(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    intro = "# Plan\n\nBoth of us write in this paragraph: "
    insert_over_rest(live, alice, sid, 0, intro)
    pages = [open_doc(browse, alice, sid), open_doc(browse, bob, sid)]
    for page in pages:
        expect_doc_text(page, intro)
        page.locator("#doc-panel .cm-content").click()
        page.keyboard.press("Control+End")  # both cursors at the end of the same paragraph
    alice_types, bob_types = "abcdefghijklmnopqrstuvwxyz" * 2, "ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2
    start = int(time.time() * 1000) + 500
    pages[0].evaluate(TYPE_AT, [alice_types, start, 15])
    pages[1].evaluate(TYPE_AT, [bob_types, start, 15])
    for page in pages:
        page.wait_for_function("window.__typing.done === true", timeout=20_000)
    spans = [page.evaluate("[window.__typing.began, window.__typing.ended]") for page in pages]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the two did not type at once: {spans}"

    # Both editors end with the same text, which the server stored: the paragraph, then
    # every character each of them typed, each person's in their order.
    expected_length = len(intro) + len(alice_types) + len(bob_types)
    pages[0].wait_for_function(f"({DOC_TEXT})().length === {expected_length}", timeout=10_000)
    final = doc_text(pages[0])
    expect_doc_text(pages[1], final)
    assert final.startswith(intro)
    assert typed_subsequence(final[len(intro):], alice_types) == alice_types
    assert typed_subsequence(final[len(intro):], bob_types) == bob_types
    assert stored(live, alice, sid)["text"] == final

    # Each sees the other's cursor, with the other's name.
    expect(pages[0].locator("#doc-panel .cm-ySelectionInfo")).to_have_text("bob")
    expect(pages[1].locator("#doc-panel .cm-ySelectionInfo")).to_have_text("alice")
    expect(pages[0].locator("#doc-people")).to_contain_text("bob")
    pages[1].keyboard.press("Shift+Home")  # bob selects his line: alice sees it in his colour
    expect(pages[0].locator("#doc-panel .cm-ySelection").first).to_be_visible()
    save_screenshot(pages[0], "doc-editor-two-cursors")


def test_an_edit_over_rest_appears_in_an_open_editor(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    page = open_doc(browse, alice, sid)
    expect_doc_text(page, "")
    before = stored(live, bob, sid)["version"]
    after = insert_over_rest(live, bob, sid, 0, "Written over REST by bob.")
    assert after["version"] > before
    expect_doc_text(page, "Written over REST by bob.")
    insert_over_rest(live, bob, sid, len("Written over REST"), ", then amended,")
    expect_doc_text(page, "Written over REST, then amended, by bob.")


def test_an_edit_in_the_editor_is_stored(browse: Any, live: Any, alice: Any, shared_session: Session) -> None:
    sid = shared_session.id
    page = open_doc(browse, alice, sid)
    page.locator("#doc-panel .cm-content").click()
    page.keyboard.type("Typed by alice")
    expect_doc_text(page, "Typed by alice")
    wait_until(lambda: stored(live, alice, sid)["text"] == "Typed by alice", timeout=10)


def test_an_editor_alone_in_the_document_keeps_its_connection(
    browse: Any, live: Any, alice: Any, shared_session: Session
) -> None:
    # y-websocket closes a socket on which nothing arrived for 30 s, and the server does not
    # send a connection its own awareness back: alone, an editor hears nothing. The page's
    # clock is Playwright's, so 40 s pass in steps without waiting for them.
    page = browse(alice, viewport=WIDE)
    page.clock.install()
    sockets: list[Any] = []
    page.on("websocket", lambda ws: sockets.append(ws) if "/doc/" in ws.url else None)
    page.goto(f"/s/{shared_session.id}/")
    expect(page.locator("#doc-panel")).to_have_attribute("data-synced", "true", timeout=SYNCED)
    assert len(sockets) == 1
    for _ in range(4):
        with sockets[0].expect_event("framereceived", timeout=10_000):
            page.clock.run_for(10_000)  # quiet for 10 s: the panel asks, the server answers
    assert len(sockets) == 1, "the panel reconnected"
    expect(page.locator("#doc-connection")).to_have_attribute("data-state", "live")


def test_edits_made_offline_are_sent_when_the_connection_returns(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    insert_over_rest(live, alice, sid, 0, "[shared]")
    alice_page, bob_page = open_doc(browse, alice, sid), open_doc(browse, bob, sid)
    alice_page.context.set_offline(True)
    expect(alice_page.locator("#doc-connection")).to_have_attribute("data-state", "offline")
    alice_page.locator("#doc-panel .cm-content").click()
    alice_page.keyboard.press("Control+Home")
    alice_page.keyboard.type("alice offline ")
    bob_page.locator("#doc-panel .cm-content").click()
    bob_page.keyboard.press("Control+End")
    bob_page.keyboard.type(" bob online")
    expect_doc_text(bob_page, "[shared] bob online")
    expect_doc_text(alice_page, "alice offline [shared]")  # nothing reached alice meanwhile

    alice_page.context.set_offline(False)  # a new connection, with a new ticket
    expect(alice_page.locator("#doc-connection")).to_have_attribute("data-state", "live", timeout=SYNCED)
    expect_doc_text(alice_page, "alice offline [shared] bob online")
    expect_doc_text(bob_page, "alice offline [shared] bob online")
    assert stored(live, bob, sid)["text"] == "alice offline [shared] bob online"


def test_a_server_killed_mid_editing_loses_nothing_and_the_editors_converge_after_it_returns(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session, tmp_path: Path
) -> None:
    sid = shared_session.id
    alice_page, bob_page = open_doc(browse, alice, sid), open_doc(browse, bob, sid)
    alice_page.locator("#doc-panel .cm-content").click()
    alice_page.keyboard.type("seen by bob.")
    expect_doc_text(bob_page, "seen by bob.")  # relayed, so stored

    live.proc.kill()  # kill -9: no goodbye to anyone
    live.proc.wait()
    for page in (alice_page, bob_page):
        expect(page.locator("#doc-connection")).to_have_attribute("data-state", "reconnecting", timeout=SYNCED)
    alice_page.keyboard.type(" Typed while it was down.")  # kept in alice's Y.Doc meanwhile

    restarted = start_server({"TANDEM_AGENT_MODE": "inline", "TANDEM_ECHO_DELAY_MS": "15"}, tmp_path,
                             name="restarted", port=live.port)
    try:
        text = "seen by bob. Typed while it was down."
        for page in (alice_page, bob_page):  # each on a new connection, with a new ticket
            expect(page.locator("#doc-connection")).to_have_attribute("data-state", "live", timeout=30_000)
            expect_doc_text(page, text)
        assert stored(restarted, alice, sid)["text"] == text
    finally:
        restarted.stop()


@pytest.mark.parametrize("server_env", [{"TANDEM_MAX_DOC_CHARS": "30"}])
def test_the_editor_refuses_typing_past_the_size_limit(
    browse: Any, live: Any, alice: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    insert_over_rest(live, alice, sid, 0, "x" * 26)
    page = open_doc(browse, alice, sid)
    page.locator("#doc-panel .cm-content").click()
    page.keyboard.press("Control+End")
    page.keyboard.type("abcdefgh")
    expect_doc_text(page, "x" * 26 + "abcd")
    expect(page.locator("#doc-notice")).to_contain_text("limited to 30 characters")
    expect(page.locator("#doc-connection")).to_have_attribute("data-state", "live")  # never refused by the server
    page.keyboard.press("Backspace")
    page.keyboard.type("Z")
    expect_doc_text(page, "x" * 26 + "abcZ")
    wait_until(lambda: stored(live, alice, sid)["text"] == "x" * 26 + "abcZ", timeout=10)


# ---------------------------------------------------------------- viewers


def test_a_viewer_reads_the_document_live_but_cannot_change_it(
    browse: Any, live: Any, alice: Any, carol: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    insert_over_rest(live, alice, sid, 0, "# Notes\n\nOnly editors write here.")
    page = open_doc(browse, carol, sid)
    expect_doc_text(page, "# Notes\n\nOnly editors write here.")
    expect(page.locator("#doc-readonly")).to_be_visible()
    expect(page.locator("#doc-readonly")).to_have_text("Read only")
    expect(page.locator("#doc-viewer-note")).to_contain_text("You are a viewer")
    content = page.locator("#doc-panel .cm-content")
    expect(content).to_have_attribute("contenteditable", "false")
    content.click()
    page.keyboard.type("carol was here")
    page.keyboard.press("Backspace")
    expect_doc_text(page, "# Notes\n\nOnly editors write here.")
    # ...and still follows everyone else's edits live.
    insert_over_rest(live, alice, sid, len("# Notes\n\n"), "Alice adds a line.\n")
    expect_doc_text(page, "# Notes\n\nAlice adds a line.\nOnly editors write here.")
    save_screenshot(page, "doc-viewer-read-only")


# A y-websocket update frame built by hand in the page: messageSync (0), then
# messageYjsUpdate (2), then the Yjs update as a length-prefixed byte array.
FORGE_UPDATE = """async ([ticket, text, closeAfter]) => {
  const { Y } = await import('/static/vendor/collab/collab.js');
  const doc = new Y.Doc();
  doc.getText('doc').insert(0, text);
  const update = Y.encodeStateAsUpdate(doc);
  const varUint = (n) => { const out = []; while (n > 127) { out.push(128 | (n & 127)); n >>>= 7; } out.push(n); return out; };
  const frame = new Uint8Array([0, 2, ...varUint(update.length), ...update]);
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/sessions/${document.getElementById('session-app').dataset.sessionId}/doc/?ticket=${encodeURIComponent(ticket)}`;
  const socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  return await new Promise((resolve) => {
    let sent = false;
    socket.onmessage = () => {
      if (sent) return;
      sent = true;
      socket.send(frame);
      if (closeAfter) setTimeout(() => socket.close(1000), closeAfter);
    };
    socket.onclose = (event) => resolve({ code: event.code, sent });
  });
}"""


def test_an_update_forged_by_a_viewer_is_refused_with_4403_and_nothing_is_stored(
    browse: Any, live: Any, alice: Any, carol: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    insert_over_rest(live, alice, sid, 0, "Untouched.")
    before = stored(live, alice, sid)
    page = open_doc(browse, carol, sid)
    result = page.evaluate(FORGE_UPDATE, [ticket_for(live, carol), "FORGED BY A VIEWER ", 0])
    assert result == {"code": 4403, "sent": True}
    after = stored(live, alice, sid)
    assert (after["text"], after["version"]) == (before["text"], before["version"])
    expect_doc_text(page, "Untouched.")
    # The same frame from an editor is applied: the refusal was about the role.
    editor = open_doc(browse, alice, sid)
    result = editor.evaluate(FORGE_UPDATE, [ticket_for(live, alice), "Edited by alice. ", 300])
    assert result == {"code": 1000, "sent": True}
    expect_doc_text(page, "Edited by alice. Untouched.")


def test_a_member_removed_while_editing_is_cut_off_and_left_read_only(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    page = open_doc(browse, bob, sid)
    expect(page.locator("#doc-panel .cm-content")).to_have_attribute("contenteditable", "true")
    response = httpx.delete(f"{live.url}/api/sessions/{sid}/members/bob/",
                            headers={"Authorization": f"Bearer {token_for(alice)}"}, timeout=10)
    assert response.status_code == 204, response.text
    expect(page.locator("#doc-connection")).to_have_attribute("data-state", "closed")
    expect(page.locator("#doc-notice")).to_contain_text("removed from this session")
    expect(page.locator("#doc-panel .cm-content")).to_have_attribute("contenteditable", "false")


# ---------------------------------------------------------------- other clients


class YClient:
    """A minimal y-websocket client on pycrdt, in this thread: it syncs, sends its own
    changes as update frames, and applies what it receives when ``pump`` reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.text = self.doc.get("doc", type=pycrdt.Text)
        self.synced = False
        self._applying = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> YClient:
        self.socket = self._stack.enter_context(ws_connect(self.url, max_size=None))
        self._subscription = self.doc.observe(self._send_local)
        self.socket.send(pycrdt.create_sync_message(self.doc))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _send_local(self, event: Any) -> None:
        if not self._applying:
            self.socket.send(pycrdt.create_update_message(event.update))

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pycrdt client: timed out with text {str(self.text)!r}")
            try:
                message = self.socket.recv(timeout=left)
            except TimeoutError:
                continue
            if isinstance(message, str) or message[0] != pycrdt.YMessageType.SYNC:
                continue  # awareness
            self._applying = True
            try:
                reply = pycrdt.handle_sync_message(message[1:], self.doc)
            finally:
                self._applying = False
            if message[1] == pycrdt.YSyncMessageType.SYNC_STEP2:
                self.synced = True
            if reply is not None:
                self.socket.send(reply)



def test_a_pycrdt_client_and_a_browser_converge(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    insert_over_rest(live, alice, sid, 0, "middle")
    with YClient(f"ws://127.0.0.1:{live.port}/ws/sessions/{sid}/doc/?ticket={ticket_for(live, bob)}") as client:
        client.pump(lambda: client.synced and str(client.text) == "middle")
        page = open_doc(browse, alice, sid)
        expect_doc_text(page, "middle")
        with client.doc.transaction():
            client.text.insert(0, "python, ")
        page.locator("#doc-panel .cm-content").click()
        page.keyboard.press("Control+End")
        page.keyboard.type(", browser")
        expected = "python, middle, browser"
        expect_doc_text(page, expected)
        client.pump(lambda: str(client.text) == expected)
        assert stored(live, alice, sid)["text"] == expected


# ---------------------------------------------------------------- preview, layout, connection


def test_the_preview_renders_the_markdown_sanitised_and_follows_edits(
    browse: Any, live: Any, alice: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    source = ("# Release notes\n\n- **Faster** sync\n- [docs](https://example.com/docs)\n\n"
              "<script>window.__pwned = 1</script> <img src=x onerror=\"window.__pwned = 2\">\n")
    insert_over_rest(live, alice, sid, 0, source)
    page = open_doc(browse, alice, sid)
    expect_doc_text(page, source)
    toggle = page.locator("#doc-preview-toggle")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    toggle.click()
    expect(toggle).to_have_attribute("aria-pressed", "true")
    preview = page.locator("#doc-preview")
    expect(preview.locator("h1")).to_have_text("Release notes")
    expect(preview.locator("li strong")).to_have_text("Faster")
    expect(preview.locator("a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(page.locator("#doc-editor")).to_be_hidden()
    # Raw HTML is text: no script, no image, no handler ran.
    expect(preview.locator("script, img")).to_have_count(0)
    expect(preview).to_contain_text("<script>window.__pwned = 1</script>")
    assert page.evaluate("window.__pwned") is None
    insert_over_rest(live, alice, sid, len("# Release notes\n\n"), "Shipped today.\n\n")
    expect(preview.locator("p").first).to_have_text("Shipped today.")
    save_screenshot(page, "doc-preview")
    toggle.click()
    expect(page.locator("#doc-editor")).to_be_visible()
    expect(preview).to_be_hidden()


def test_on_a_phone_the_document_is_a_tab(browse: Any, live: Any, bob: Any, shared_session: Session) -> None:
    page = browse(bob, viewport=PHONE)
    page.goto(f"/s/{shared_session.id}/")
    expect(page.locator("#doc-panel")).to_be_hidden()
    expect(page.get_by_role("tab", name="Conversation")).to_have_attribute("aria-selected", "true")
    page.get_by_role("tab", name="Document").click()
    expect(page.get_by_role("tabpanel", name="Document")).to_be_visible()
    expect(page.locator("#composer")).to_be_hidden()
    expect(page.locator("#doc-panel")).to_have_attribute("data-synced", "true", timeout=SYNCED)
    page.locator("#doc-panel .cm-content").click()
    page.keyboard.type("# On the go\n\n- typed on a phone")
    expect_doc_text(page, "# On the go\n\n- typed on a phone")
    save_screenshot(page, "doc-phone-tab")
    page.get_by_role("tab", name="Conversation").click()
    expect(page.locator("#composer")).to_be_visible()


def test_on_a_wide_screen_the_document_is_beside_the_conversation(
    browse: Any, live: Any, bob: Any, shared_session: Session
) -> None:
    page = open_doc(browse, bob, shared_session.id)
    expect(page.get_by_role("tab", name="Document")).to_be_hidden()
    expect(page.get_by_role("tabpanel")).to_have_count(0)
    conversation = page.locator(".conversation").bounding_box()
    panel = page.locator("#doc-panel").bounding_box()
    assert conversation is not None and panel is not None
    assert panel["x"] >= conversation["x"] + conversation["width"]


# ---------------------------------------------------------------- the agent


def test_the_agents_approved_edit_appears_live_in_every_open_editor(
    browse: Any, live: Any, alice: Any, bob: Any, carol: Any, shared_session: Session
) -> None:
    sid = shared_session.id
    Session.objects.filter(pk=sid).update(agent="tools")
    insert_over_rest(live, alice, sid, 0, "# Plan")
    alice_page, carol_page = open_doc(browse, alice, sid), open_doc(browse, carol, sid)
    expect(alice_page.locator("#connection")).to_have_attribute("data-state", "live", timeout=SYNCED)
    box = alice_page.get_by_label("Message", exact=True)
    box.fill("!doc append Agreed: ship on Friday.")
    box.press("Enter")
    # The request is answered inline, on the tool card that asks (no modal dialog).
    approval = alice_page.locator(".tool-card .approval")
    approve = approval.get_by_role("button", name="Approve running doc_edit")
    expect(approve).to_be_visible(timeout=15_000)
    expect_doc_text(alice_page, "# Plan")  # nothing changes before the answer
    approve.click()
    expect_doc_text(alice_page, "# Plan\n\nAgreed: ship on Friday.", timeout=20_000)
    expect_doc_text(carol_page, "# Plan\n\nAgreed: ship on Friday.")
    assert stored(live, alice, sid)["text"] == "# Plan\n\nAgreed: ship on Friday."
    # The session's log says the agent wrote it (doc.updated is coalesced: the last one).
    def last_by() -> list[Any]:
        events = Event.objects.filter(session_id=sid, type="doc.updated").order_by("seq")
        return [json.loads(e.envelope)["properties"]["by"] for e in events][-1:]

    wait_until(lambda: last_by() == ["agent"], timeout=10)
