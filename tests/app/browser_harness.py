"""The real browser for the UI tests: Debian's Chromium through Playwright, one per test module, and a fresh page
(its own cookies) per test. The `page` fixture opens the test module's `server` fixture; `open_page` opens any URL.
conftest.py makes the fixtures available to every test module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.app.server_harness import RunningServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
UI_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def open_page(browser: Browser, url: str) -> Iterator[Page]:
    """A page showing `url` in a fresh browser context, closed when the block ends."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        page.goto(url)
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, server: RunningServer) -> Iterator[Page]:
    with open_page(browser, f"{server.url}/") as opened:
        yield opened


def message_box(page: Page) -> Locator:
    return page.get_by_test_id("textbox").first  # the chat's textbox comes before the settings' system prompt


def send(page: Page, text: str) -> None:
    message_box(page).fill(text)
    message_box(page).press("Enter")


def choose_greedy_decoding(page: Page) -> None:
    """Opens the generation settings and sets temperature 0: the tiny model's reply is then the same every run (a
    sampled one may end at its first token, an empty reply)."""
    page.get_by_text("Generation settings").click()
    page.get_by_label("number input for Temperature (0: greedy)").fill("0")


def bot_messages(page: Page) -> Locator:
    return page.locator('[data-testid="bot"]')


def stop_button(page: Page) -> Locator:
    return page.locator("button.stop-button")
