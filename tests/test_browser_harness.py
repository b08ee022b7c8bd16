"""The browser harness: a real headless Chromium, keyboard only, offline but for loopback, screenshots."""

from __future__ import annotations

import html
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect

from tests.browser import PageGuard, focused, keep_screenshot, screenshot, tab_order, tab_to

pytestmark = pytest.mark.browser

PAGES = {
    "/": """<!doctype html><html lang="en"><title>Greeter</title>
        <a href="#greet" id="skip">Skip to the form</a>
        <form id="greet" action="/greet"><label for="name">Name</label> <input id="name" name="name">
        <button type="submit">Greet</button></form>""",
    "/cdn": """<!doctype html><title>Reaches out</title>
        <script src="https://cdn.jsdelivr.net/npm/htmx.org/dist/htmx.min.js"></script>
        <img src="http://192.0.2.1/logo.png" alt="logo"><p>Offline</p>""",
    "/broken": "<!doctype html><title>Broken</title><script>throw new Error('broken script')</script>",
}


class Handler(BaseHTTPRequestHandler):
    """Serves PAGES, and /greet?name=… as a greeting."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/greet":
            name = parse_qs(url.query).get("name", [""])[0]
            body = f"<!doctype html><title>Greeting</title><h1>Hello, {html.escape(name)}</h1>"
        elif url.path in PAGES:
            body = PAGES[url.path]
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """The pages above on a loopback port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_form_is_filled_and_sent_with_the_keyboard_only(page: Page, site: str) -> None:
    page.goto(site)
    assert tab_order(page, 3) == ['a#skip "Skip to the form"', 'input#name "name"', 'button "Greet"']
    page.goto(site)
    assert tab_to(page, page.get_by_label("Name")) == 2
    page.keyboard.type("Ada Lovelace")
    tab_to(page, page.get_by_role("button", name="Greet"))
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading")).to_have_text("Hello, Ada Lovelace")
    assert focused(page) == "body"


def test_tab_to_fails_with_where_the_focus_went(page: Page, site: str) -> None:
    page.goto(site)
    with pytest.raises(AssertionError, match="not reached in 2 Tab presses"):
        tab_to(page, page.get_by_role("button", name="Greet"), limit=2)


def test_requests_beyond_loopback_are_blocked_and_fail_the_test(
    page: Page, page_guard: PageGuard, site: str
) -> None:
    page.goto(f"{site}/cdn")
    expect(page.get_by_text("Offline")).to_be_visible()
    assert sorted(page_guard.blocked) == [
        "http://192.0.2.1/logo.png",
        "https://cdn.jsdelivr.net/npm/htmx.org/dist/htmx.min.js",
    ]
    assert page.evaluate("() => typeof htmx") == "undefined"
    with pytest.raises(AssertionError, match="reached beyond loopback"):
        page_guard.check()
    page_guard.blocked.clear()


def test_a_fetch_beyond_loopback_fails_in_the_page(page: Page, page_guard: PageGuard, site: str) -> None:
    page.goto(site)
    outcome = page.evaluate(
        "() => fetch('https://example.com/').then(() => 'reached', error => 'failed: ' + error.name)"
    )
    assert outcome == "failed: TypeError"
    assert page_guard.blocked == ["https://example.com/"]
    page_guard.blocked.clear()


def test_uncaught_page_errors_fail_the_test(page: Page, page_guard: PageGuard, site: str) -> None:
    page.goto(f"{site}/broken")
    assert len(page_guard.errors) == 1
    assert "broken script" in page_guard.errors[0]
    with pytest.raises(AssertionError, match="uncaught errors"):
        page_guard.check()
    page_guard.errors.clear()


def test_screenshots_are_png_files_at_the_viewport_width(
    page: Page, site: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page.goto(site)
    path = screenshot(page, tmp_path / "shots" / "form.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1280, 800)

    monkeypatch.delenv("CXR_SCREENSHOTS", raising=False)
    assert keep_screenshot(page, "form") is None
    monkeypatch.setenv("CXR_SCREENSHOTS", str(tmp_path / "readme"))
    kept = keep_screenshot(page, "form")
    assert kept == tmp_path / "readme" / "form.png"
    assert kept.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
