"""The Compare tab in a real browser (Debian's Chromium through Playwright) against the real server: one prompt to the
base model and the adapter, both replies streamed side by side, each column its own conversation, greedy with a fixed
seed by default (the replies equal each model's own greedy reply), the choice of the better one, the session's JSONL
download, and the layout at desktop and phone widths (screenshots in test-artifacts/)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from inference_app.service import SamplingParams
from inference_app.settings import Settings
from inference_app.web.compare import COMPARE_TAB, DOWNLOAD_BUTTON, SEND_BUTTON
from tests.app.server_harness import RunningServer, running_server
from tests.app.service_harness import collect_chunks

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BASE, ADAPTER = "Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct-ft"
REPLY_TOKENS = 16


@pytest.fixture(scope="module")
def server(tiny_settings: Settings) -> Iterator[RunningServer]:
    with running_server(tiny_settings) as running:
        yield running


def greedy_reply(server: RunningServer, model: str, messages: list[dict[str, str]]) -> str:
    """The model's own greedy reply, from the service (on a thread: Playwright's loop runs on this one)."""
    params = SamplingParams(max_new_tokens=REPLY_TOKENS, temperature=0.0, seed=0)
    with ThreadPoolExecutor(1) as thread:
        chunks = thread.submit(collect_chunks, server.service, messages, params, model=model).result()
    return "".join(chunk.text for chunk in chunks)


def send_to_both(page: Page, prompt: str, replies_before: int) -> None:
    page.locator("#compare-prompt textarea").fill(prompt)
    page.get_by_role("button", name=SEND_BUTTON).click()
    for side in ("a", "b"):
        expect(page.locator(f"#compare-{side} [data-testid='bot']")).to_have_count(replies_before + 1)
    expect(page.locator("#compare-prompt textarea")).to_have_value("")  # emptied when both replies are complete
    expect(page.get_by_role("button", name=DOWNLOAD_BUTTON)).to_be_visible()


def shown_replies(page: Page, turn: int) -> dict[str, str]:
    return {side: page.locator(f"#compare-{side} [data-testid='bot']").nth(turn).inner_text() for side in ("a", "b")}


def test_compare_two_models_side_by_side_choose_and_download(page: Page, server: RunningServer) -> None:
    page.get_by_role("tab", name=COMPARE_TAB).click()
    expect(page.get_by_label("Model A")).to_have_value(BASE)  # base against the default adapter by default
    expect(page.get_by_label("Model B")).to_have_value(ADAPTER)
    page.get_by_text("Settings (both models)").click()
    expect(page.get_by_label("number input for Temperature, 0 = greedy")).to_have_value("0")
    expect(page.get_by_label("Seed")).to_have_value("0")
    reply_length = page.get_by_label("number input for Reply length in tokens")
    reply_length.fill(str(REPLY_TOKENS))
    reply_length.press("Tab")  # the slider takes a typed number when its box loses focus, not at each keystroke

    hello = [{"role": "user", "content": "Hello, world!"}]
    first = {"a": greedy_reply(server, BASE, hello), "b": greedy_reply(server, ADAPTER, hello)}
    assert first["a"] != first["b"]
    send_to_both(page, "Hello, world!", 0)
    assert shown_replies(page, 0) == {side: reply.strip() for side, reply in first.items()}
    page.get_by_role("button", name="B is better").click()
    expect(page.get_by_text("Prompt 1 marked: B is better.")).to_be_visible()

    # Each column sends its own conversation as the history of the next prompt.
    cat = {"role": "user", "content": "Tell me a story about a cat."}
    second = {
        side: greedy_reply(server, model, [*hello, {"role": "assistant", "content": first[side]}, cat])
        for side, model in (("a", BASE), ("b", ADAPTER))
    }
    send_to_both(page, cat["content"], 1)
    assert shown_replies(page, 1) == {side: reply.strip() for side, reply in second.items()}
    page.get_by_role("button", name="Tie").click()
    expect(page.get_by_text("Prompt 2 marked: Tie.")).to_be_visible()  # the session file now has the choice
    expect(page.locator(".toast-body")).to_have_count(0)  # no error popped up

    with page.expect_download() as download:
        page.get_by_role("button", name=DOWNLOAD_BUTTON).click()
    records = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert [(record["prompt"], record["choice"]) for record in records] == [
        ("Hello, world!", "b"),
        (cat["content"], "tie"),
    ]
    assert [(record["a"], record["b"]) for record in records] == [
        ({"model": BASE, "reply": replies["a"]}, {"model": ADAPTER, "reply": replies["b"]})
        for replies in (first, second)
    ]
    assert records[1]["settings"] == {"max_new_tokens": REPLY_TOKENS, "temperature": 0, "top_p": 1}
    assert records[1]["seed"] == 0

    ARTIFACTS.mkdir(exist_ok=True)
    for width, name in ((1280, "desktop"), (400, "phone")):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=ARTIFACTS / f"compare-{name}.png", full_page=True)
        for side in ("a", "b"):  # both columns fully on the page, none cut off at the right edge
            box = page.locator(f"#compare-{side}").bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (name, side, box)
