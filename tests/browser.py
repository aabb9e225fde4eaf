"""Real-browser fixtures: Debian's Chromium driven by Playwright, against a real server
process. A failing test leaves a screenshot of every page it opened in
``test-artifacts/``."""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium")
# What the machine's notes say headless Chromium needs here: no sandbox as root, and no
# background traffic to hosts this network refuses.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# The main states of the UI, saved by the browser tests on every run for reviewers (README).
SCREENSHOTS = ARTIFACTS / "screenshots"


def save_screenshot(page: Any, name: str, *, full_page: bool = False) -> Path:
    """Saves what ``page`` shows now as ``test-artifacts/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[Any]) -> None:
    # Playwright's sync API leaves an event loop set on the main thread, and async
    # tests after it could not start theirs: browser tests run last.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():  # a browser test never skips: it fails, saying why
        pytest.fail(f"Chromium is required at {CHROMIUM} (apt-get install chromium)")
    # Playwright's sync API keeps an event loop on this thread, and Django then refuses
    # the ORM here (it guards against blocking a loop). The tests' own ORM calls are the
    # only ones on this thread, so the guard has nothing to protect.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def live(servers: Any) -> Any:
    """One real server process (inline agents, in-memory layer), its base URL in .url."""
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="15")
    return server


@pytest.fixture
def browse(chromium: Any, live: Any, request: Any) -> Iterator[Callable[..., Any]]:
    """``browse(user)`` gives a page in a fresh browser context, logged in as ``user``
    (or anonymous with None)."""
    from tests.conftest import PASSWORD

    contexts: list[Any] = []
    pages: list[Any] = []

    def open_page(user: Any | None = None, **context_options: Any) -> Any:
        context = chromium.new_context(base_url=live.url, **context_options)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        pages.append(page)
        page.console_messages = []  # type: ignore[attr-defined]
        page.on("console", lambda msg: page.console_messages.append(f"{msg.type}: {msg.text}"))  # type: ignore[attr-defined]
        page.on("pageerror", lambda exc: page.console_messages.append(f"pageerror: {exc}"))  # type: ignore[attr-defined]
        if user is not None:
            page.goto("/accounts/login/")
            page.get_by_label("Username").fill(user.get_username())
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(re.compile(r".*/$"))
        return page

    yield open_page
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        ARTIFACTS.mkdir(exist_ok=True)
        for i, page in enumerate(pages):
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}-{i}.png"), full_page=True)
                (ARTIFACTS / f"{name}-{i}.console.txt").write_text("\n".join(page.console_messages))  # type: ignore[attr-defined]
            except Exception as exc:  # the page may be gone; the failure itself matters more
                print(f"no screenshot of page {i}: {exc}")
    for context in contexts:
        context.close()


class _PlainPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        body = b"<!doctype html><title>another site</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_origins() -> Iterator[list[str]]:
    """Two plain pages on 127.0.0.1, each on a port of its own: real other origins (a page
    Playwright makes up does not count as on this machine, and Chromium keeps such pages
    from loopback servers)."""
    started = [ThreadingHTTPServer(("127.0.0.1", 0), _PlainPage) for _ in range(2)]
    for server in started:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in started]
    for server in started:
        server.shutdown()
        server.server_close()
