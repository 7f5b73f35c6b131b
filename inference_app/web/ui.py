"""The Gradio chat UI: a multi-turn chat with streamed replies, through the same ModelService.stream_chat as the API.

An error never locks the chat: a prompt the model cannot take, or a model that is not ready, is answered in the chat
(a reply starting with NOT_ANSWERED, left out of the next prompts), the input stays usable, and "Drop the oldest
exchange" (or the chat's trash icon) shortens a conversation grown too long. A notice above the chat says while
the model is loading, or that it failed, before anyone types.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator
from typing import Any

import gradio as gr
from starlette.requests import HTTPConnection

from inference_app.client_limit import ClientLimitExceededError, PerClientLimit
from inference_app.service import (
    InvalidRequestError,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
)
from inference_app.settings import Settings
from inference_app.web.auth import client_address
from inference_app.web.chat_history import NOT_ANSWERED, conversation
from inference_app.web.compare import COMPARE_TAB, build_compare_tab

CHAT_TAB = "Chat"
CHAT_API_NAME = "chat"  # gradio_client: Client(url).predict(message, system_prompt, ..., api_name="/chat")
EXAMPLES = [
    ["Write a haiku about the sea."],
    ["Explain in one sentence what a LoRA adapter is."],
]
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
STATUS_REFRESH_S = 2.0  # how often the page asks for the model's status until it is ready or failed
TRIM_BUTTON = "Drop the oldest exchange"
DEMO_NOTICE = (
    "**This is a demo** (`--demo`): a small model with random weights and a random LoRA adapter, so the replies"
    " are gibberish. It shows the app, not a model; serve your own with `--model` and `--adapter`."
)
# The page's theme (given where the page is mounted): the system's own fonts only. Gradio's default theme loads its
# fonts from Google, and offline the fallback drew "LoRA" with a small-capital A.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
SIGN_OUT_BUTTON = "Sign out"
_SHOW_WHEN_NOT_EMPTY_JS = "(history) => ({__type__: 'update', visible: history.length > 0})"
# POST, from this page only: a link on another site cannot sign anyone out (see inference_app.web.sign_in).
_SIGN_OUT_JS = "async () => { await fetch('./logout', {method: 'POST'}); window.location.reload(); }"


def build_ui(
    settings: Settings, service: ModelService, client_limit: PerClientLimit, *, sign_out: bool = False
) -> gr.Blocks:
    """The chat page; with `sign_out` (password mode), a Sign out button. Its chats count against `client_limit`
    with the API's."""

    async def respond(
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        request: gr.Request,
    ) -> AsyncGenerator[str, None]:
        messages = conversation(message, history, system_prompt)
        reply = ""
        try:
            params = SamplingParams(
                max_new_tokens=_whole_number(max_new_tokens, "max_new_tokens"),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=_whole_number(top_k, "top_k") or None,  # 0 on the slider: no top-k filtering
            )
            # The service checks the request (as for the API). wait=True: beyond the generation slots, a chat waits
            # here for one (the API answers 429 instead).
            chunks = client_limit.limited(_client(request), service.stream_chat(messages, params, wait=True))
            async with contextlib.aclosing(chunks):  # the stop button or a closed tab cancels us: stop generating
                async for chunk in chunks:
                    reply += chunk.text
                    yield reply
        except PromptTooLongError as error:
            yield f"{NOT_ANSWERED}{error}. Use “{TRIM_BUTTON}” below, or the trash icon to start over."
        except InvalidRequestError as error:  # only through the UI's API: the sliders hold valid settings
            yield f"{NOT_ANSWERED}{error}."
        except ModelNotReadyError as error:
            yield f"{NOT_ANSWERED}the model is not ready: {error}."
        except ClientLimitExceededError as error:
            yield f"{NOT_ANSWERED}{error}."

    title = f"Chat with {settings.model_id}" + (" + LoRA adapter" if settings.served_adapters else "")
    # The page's title is also served to anyone (the login page's tab, /manifest.json): in password mode, no model.
    page_title = "Chat" if sign_out else title
    with gr.Blocks(
        title=page_title, analytics_enabled=False
    ) as page:  # analytics off: offline in tests, never phones home
        if settings.demo:
            gr.Markdown(DEMO_NOTICE)
        status = gr.Markdown(_status_notice(service))
        with gr.Tabs():
            with gr.Tab(CHAT_TAB):
                chat = gr.ChatInterface(
                    respond,
                    title=title,
                    description=_header(settings),
                    # render=False: the chat places them (in its accordion), not the page they are created in.
                    additional_inputs=[
                        gr.Textbox(
                            label="System prompt",
                            lines=2,
                            placeholder="Optional instructions for the model",
                            render=False,
                        ),
                        gr.Slider(
                            1,
                            settings.max_new_tokens_cap,
                            value=min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_cap),
                            step=1,
                            label="Max new tokens",
                            render=False,
                        ),
                        gr.Slider(
                            0.0,
                            2.0,
                            value=DEFAULT_TEMPERATURE,
                            step=0.05,
                            label="Temperature (0: greedy)",
                            render=False,
                        ),
                        gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p", render=False),
                        gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)", render=False),
                    ],
                    additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
                    examples=EXAMPLES,
                    api_name=CHAT_API_NAME,
                    analytics_enabled=False,
                )
                trim = gr.Button(TRIM_BUTTON, size="sm", variant="secondary", visible=False)  # once there is one
                # Through the chat's own value: the chat then hands the shortened history to the next reply.
                trim.click(drop_oldest_exchange, chat.chatbot, chat.chatbot_value, api_visibility="undocumented")
                # In the browser alone (no request per streamed token): the button shows once the chat has a message.
                chat.chatbot.change(None, chat.chatbot, trim, js=_SHOW_WHEN_NOT_EMPTY_JS)
            with gr.Tab(COMPARE_TAB):
                build_compare_tab(settings, service)
        if sign_out:
            gr.Button(SIGN_OUT_BUTTON, size="sm", variant="secondary").click(None, js=_SIGN_OUT_JS)

        timer = gr.Timer(STATUS_REFRESH_S, active=service.status == "loading")

        def refresh_status() -> tuple[str, gr.Timer]:
            return _status_notice(service), gr.Timer(active=service.status == "loading")

        timer.tick(refresh_status, None, [status, timer], api_visibility="undocumented", queue=False)
        page.load(refresh_status, None, [status, timer], api_visibility="undocumented", queue=False)
    return page.queue(default_concurrency_limit=settings.max_concurrent_generations)


def drop_oldest_exchange(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat without its first user message and the replies to it."""
    later_users = [index for index, turn in enumerate(history) if turn["role"] == "user" and index > 0]
    return history[later_users[0] :] if later_users else []


def _whole_number(value: float, param: str) -> int:
    """A slider's value as an int; NaN and infinity (which a client of the UI's API can send) are refused."""
    if not math.isfinite(value):
        raise InvalidRequestError(f"invalid '{param}': must be a number", param)
    return int(value)


def _client(request: gr.Request) -> str:
    """The chat's client, as the API counts it: the address of the request that joined Gradio's queue."""
    connection = request.request
    return client_address(connection) if isinstance(connection, HTTPConnection) else "unknown"


def _status_notice(service: ModelService) -> str:
    if service.status == "loading":
        return "⏳ **The model is loading.** Replies start once it is ready; this notice goes away then."
    if service.status == "failed":
        return f"❌ **The model failed to load**, so the chat cannot answer: {service.failure_reason}"
    return ""


def _header(settings: Settings) -> str:
    """What is served, by name: folder paths say nothing to a visitor and tell too much about the server."""
    served = f"API model id `{settings.served_model_id}` at `/v1/chat/completions`."
    if not settings.served_adapters:
        return f"Base model `{settings.model_id}` without an adapter (`--base-only`). {served}"
    others = [f"`{model_id}`" for model_id in settings.model_ids if model_id != settings.served_model_id]
    return (
        f"Base model `{settings.model_id}` with the LoRA adapter `{settings.served_model_id}`. {served}"
        f" Also served: {', '.join(others)}."
    )
