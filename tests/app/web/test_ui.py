"""The Gradio chat UI: in a real browser (Debian's Chromium through Playwright) against the real server, and the
conversation it builds from Gradio 6's chat history."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from playwright.sync_api import Browser, Page, expect

from inference_app.settings import AdapterOption, Settings
from inference_app.web.ui import NOT_ANSWERED, TRIM_BUTTON, conversation, drop_oldest_exchange
from tests.app.browser_harness import bot_messages, choose_greedy_decoding, message_box, open_page, send, stop_button
from tests.app.server_harness import RunningServer, engine_is_idle, running_server
from tests.server_process import wait_for

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
# A prompt whose greedy reply from the tiny model is longer than LONG_REPLY_TOKENS (see test_http_api.py).
LONG_PROMPT = "Hello, world!"
LONG_REPLY_TOKENS = 200

# Records every text the latest bot message shows, so the test can tell a streamed reply from one that appears
# all at once.
RECORD_BOT_TEXTS = """() => {
    window.botTexts = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.botTexts.push([bots.length, bots[bots.length - 1].innerText]);
    }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def test_conversation_flattens_gradio_6_history() -> None:
    """Gradio 6 hands the chat function a history whose content is a list of text blocks; Phi-3's chat template
    needs strings. The history here goes through Gradio's own Chatbot postprocess/preprocess, as in the browser."""
    chatbot = gr.Chatbot()
    history = chatbot.preprocess(
        chatbot.postprocess(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
        )
    )
    assert history[0]["content"] == [{"type": "text", "text": "Hi"}]  # the shape this test is about

    assert conversation("Tell me a story.", history, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a story."},
    ]
    assert conversation("Hi", [], None) == [{"role": "user", "content": "Hi"}]
    assert conversation("Hi", [], "  ") == [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_settings: Settings) -> Iterator[RunningServer]:
    with running_server(tiny_settings) as running:
        yield running


@pytest.mark.slow
@pytest.mark.browser
def test_chat_streams_replies_in_a_multi_turn_conversation(page: Page) -> None:
    expect(page.get_by_role("heading", name="Chat with Phi-3-mini-4k-instruct + LoRA adapter")).to_be_visible()
    expect(page.get_by_text("with the LoRA adapter Phi-3-mini-4k-instruct-ft")).to_be_visible()
    expect(page.get_by_text("Write a haiku about the sea.")).to_be_visible()  # an example
    choose_greedy_decoding(page)
    page.get_by_label("number input for Max new tokens").fill("200")
    page.get_by_label("System prompt").fill("You are a helpful assistant.")
    expect(message_box(page)).to_have_attribute("placeholder", "Type a message...")
    page.evaluate(RECORD_BOT_TEXTS)

    send(page, "Hello, world!")
    expect(bot_messages(page)).to_have_count(1)
    expect(message_box(page)).to_be_editable()  # the reply is complete
    first_reply = bot_messages(page).first.inner_text()
    assert first_reply.strip()
    texts = [text for count, text in page.evaluate("window.botTexts") if count == 1 and text.strip()]
    assert len(set(texts)) >= 3, f"the reply did not stream: {texts}"
    assert len(texts[0]) < len(first_reply)

    # The second turn sends the first one back as history (Gradio 6 content blocks, flattened for the template).
    send(page, "Tell me a story about a cat.")
    expect(bot_messages(page)).to_have_count(2)
    expect(message_box(page)).to_be_editable()
    assert bot_messages(page).nth(1).inner_text().strip()
    expect(page.locator(".toast-body")).to_have_count(0)  # no error popped up

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-ui.png", full_page=True)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.usefixtures("paced_decoding")
def test_stop_button_stops_the_generation(page: Page, server: RunningServer) -> None:
    choose_greedy_decoding(page)
    page.get_by_label("number input for Max new tokens").fill(str(LONG_REPLY_TOKENS))
    steps_before = server.service.generation_stats()["decode_steps"]

    send(page, LONG_PROMPT)
    expect(bot_messages(page)).to_have_count(1)  # the reply has started
    # Gradio gives it no accessible name, and re-renders it with every streamed chunk, so it is never "stable" for
    # a pointer click: send the click event to it directly.
    page.locator("button.stop-button").dispatch_event("click")

    expect(message_box(page)).to_be_editable()
    wait_for(lambda: engine_is_idle(server.service), 10, "the generation to stop")
    steps = server.service.generation_stats()["decode_steps"] - steps_before
    assert steps < LONG_REPLY_TOKENS / 2, f"{steps} decode steps: the generation ran on after Stop"


@pytest.mark.slow
@pytest.mark.browser
def test_a_conversation_too_long_is_answered_in_the_chat_and_can_be_trimmed(page: Page) -> None:
    expect(page.get_by_role("button", name=TRIM_BUTTON)).to_have_count(0)  # nothing to drop in an empty chat
    send(page, "Hello")
    expect(bot_messages(page)).to_have_count(1)
    expect(message_box(page)).to_be_editable()

    send(page, "word " * 600)  # more tokens than the tiny model's context (512)
    expect(bot_messages(page)).to_have_count(2)
    expect(bot_messages(page).nth(1)).to_contain_text(NOT_ANSWERED.strip())
    expect(bot_messages(page).nth(1)).to_contain_text("shorten the conversation")
    expect(message_box(page)).to_be_editable()  # not locked: the turn is over
    expect(stop_button(page)).to_be_hidden()

    # Still too long (the long message stays in the chat) until it is trimmed away.
    page.get_by_role("button", name=TRIM_BUTTON).click()
    expect(bot_messages(page)).to_have_count(1)
    expect(bot_messages(page).first).to_contain_text(NOT_ANSWERED.strip())
    page.get_by_role("button", name=TRIM_BUTTON).click()
    expect(bot_messages(page)).to_have_count(0)
    expect(page.get_by_role("button", name=TRIM_BUTTON)).to_have_count(0)

    send(page, "Tell me a story about a cat.")
    expect(bot_messages(page)).to_have_count(1)
    expect(message_box(page)).to_be_editable()
    assert NOT_ANSWERED.strip() not in bot_messages(page).first.inner_text()
    expect(page.locator(".toast-body")).to_have_count(0)  # nothing popped up and went away


def test_error_replies_and_trimmed_turns_are_left_out_of_the_prompt() -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "word " * 600},
        {"role": "assistant", "content": f"{NOT_ANSWERED}the prompt has 700 tokens"},
    ]
    assert conversation("Again", history, None) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "word " * 600},
        {"role": "user", "content": "Again"},
    ]
    assert drop_oldest_exchange(history) == history[2:]
    assert drop_oldest_exchange(history[2:]) == []
    assert drop_oldest_exchange([]) == []


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_says_while_the_model_loads_and_answers_once_it_is_ready(
    tiny_settings: Settings, browser: Browser
) -> None:
    with running_server(tiny_settings, start_loading=False) as loading, open_page(browser, loading.url) as page:
        notice = page.get_by_text("The model is loading")
        expect(notice).to_be_visible()

        send(page, "Hello")
        expect(bot_messages(page)).to_have_count(1)
        expect(bot_messages(page).first).to_contain_text("the model is not ready")
        expect(message_box(page)).to_be_editable()

        loading.service.start_loading()
        expect(notice).to_be_hidden()  # the page asks again until the model is ready
        send(page, "Hello")
        expect(bot_messages(page)).to_have_count(2)
        expect(message_box(page)).to_be_editable()
        assert NOT_ANSWERED.strip() not in bot_messages(page).nth(1).inner_text()


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_says_when_the_model_failed_to_load(tiny_settings: Settings, browser: Browser, tmp_path: Path) -> None:
    settings = dataclasses.replace(tiny_settings, adapters=(AdapterOption(None, tmp_path / "no-such-adapter"),))
    with running_server(settings, start_loading=False) as failing:
        failing.service.start_loading()
        wait_for(lambda: failing.service.status == "failed", 30, "loading to fail")
        with open_page(browser, failing.url) as page:
            expect(page.get_by_text("The model failed to load")).to_be_visible()
            send(page, "Hello")
            expect(bot_messages(page).first).to_contain_text("the model is not ready")
            expect(message_box(page)).to_be_editable()
