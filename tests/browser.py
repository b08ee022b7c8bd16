"""Browser tests: Debian's headless Chromium through Playwright, kept off every network but loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, sync_playwright

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# No host resolves but loopback, so even the browser's own background traffic (outside any page) goes nowhere.
LAUNCH_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
CONTEXT_OPTIONS = {
    "viewport": {"width": 1280, "height": 800},
    "device_scale_factor": 1,
    "locale": "en-US",
    "timezone_id": "UTC",
    "color_scheme": "light",
    "reduced_motion": "reduce",
    "service_workers": "block",  # requests from a service worker would bypass the loopback guard
}
DESCRIBE_FOCUS = """() => {
    const e = document.activeElement;
    if (!e || e === document.body) return "body";
    const name = (e.getAttribute("aria-label") || e.innerText || e.value || e.name || "").trim();
    const id = e.id ? "#" + e.id : "";
    return e.tagName.toLowerCase() + id + (name ? ` "${name.slice(0, 40)}"` : "");
}"""
SCREENSHOTS_ENV = "CXR_SCREENSHOTS"  # e.g. docs/screenshots: the README's pictures are written there


@contextmanager
def launched_browser() -> Iterator[Browser]:
    """Headless Chromium from the `chromium` on PATH; skips the test where it is not installed.

    As root in a container Chromium refuses its sandbox, so it runs without (`--no-sandbox`); Playwright also
    passes `--disable-dev-shm-usage`, so a small /dev/shm cannot crash it.
    """
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False, args=LAUNCH_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageGuard:
    """What a page did that a test should not allow: requests beyond loopback (aborted), uncaught errors."""

    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        """Lets loopback requests through; aborts and records any other."""
        if urlsplit(route.request.url).hostname in LOOPBACK_HOSTS:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("blockedbyclient")

    def check(self) -> None:
        """Fails when anything was recorded (a test expecting some clears it first)."""
        assert not self.blocked, f"the page reached beyond loopback: {self.blocked}"
        assert not self.errors, f"uncaught errors in the page: {self.errors}"


@contextmanager
def guarded_page(browser: Browser, guard: PageGuard) -> Iterator[Page]:
    """A page in a fresh context (no cookies or storage from other tests), watched by `guard`."""
    context = browser.new_context(**CONTEXT_OPTIONS)
    try:
        context.route("**/*", guard.route)
        page = context.new_page()
        page.on("pageerror", lambda error: guard.errors.append(str(error)))
        yield page
    finally:
        context.close()
    guard.check()


def screenshot(page: Page, path: Path) -> Path:
    """Saves the whole page as a PNG at `path` (folders created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
    return path


def keep_screenshot(page: Page, name: str) -> Path | None:
    """Saves `name`.png in the folder $CXR_SCREENSHOTS names (relative to the repository) when set."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    return screenshot(page, REPO / folder / f"{name}.png") if folder else None


def is_focused(locator: Locator) -> bool:
    """Whether the element has the keyboard focus."""
    return bool(locator.evaluate("element => element === document.activeElement"))


def focused(page: Page) -> str:
    """The focused element in brief, e.g. `button#save "Save"`, for messages and focus-order checks."""
    return str(page.evaluate(DESCRIBE_FOCUS))


def tab_to(page: Page, target: Locator, limit: int = 40) -> int:
    """Presses Tab until `target` has the focus; returns how many presses it took, fails past `limit`."""
    for presses in range(1, limit + 1):
        page.keyboard.press("Tab")
        if is_focused(target):
            return presses
    raise AssertionError(f"{target} not reached in {limit} Tab presses (focus on {focused(page)})")


def tab_order(page: Page, count: int) -> list[str]:
    """The elements the focus visits over `count` Tab presses, each as `focused` describes it."""
    order = []
    for _ in range(count):
        page.keyboard.press("Tab")
        order.append(focused(page))
    return order
