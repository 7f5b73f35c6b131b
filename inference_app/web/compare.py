"""The Compare tab: one prompt to two served models (the base and the default adapter unless chosen otherwise), both
replies streamed side by side, each column keeping its own conversation; shared settings, greedy with a fixed seed
by default, so that a comparison can be repeated. The user marks the better reply, and downloads the session as JSONL
(one line per prompt: the settings, both models and replies, the choice) for later analysis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncGenerator
from typing import Any

import gradio as gr

from inference_app.service import (
    InvalidRequestError,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
    UnknownModelError,
)
from inference_app.settings import Settings
from inference_app.web.chat_history import NOT_ANSWERED, conversation

COMPARE_TAB = "Compare"
SEND_BUTTON = "Send to both"
CHOICES = {"A is better": "a", "B is better": "b", "Tie": "tie"}
DOWNLOAD_BUTTON = "Download session (JSONL)"
DEFAULT_SEED = 0
DEFAULT_MAX_NEW_TOKENS = 256


def build_compare_tab(settings: Settings, service: ModelService) -> None:
    """The tab's components and events, inside the page being built."""
    model_ids = list(settings.model_ids)
    # Base against the default adapter; in base-only mode there is one model, compared with itself (seeds differ).
    left, right = settings.model_id, settings.served_model_id
    gr.Markdown(
        "One prompt, two models, replies side by side. Greedy decoding with a fixed seed by default, so the same"
        " prompt gives the same replies. Mark the better one, then download the session as JSONL."
    )
    with gr.Row(equal_height=True):
        model_a = gr.Dropdown(model_ids, value=left, label="Model A", interactive=True)
        model_b = gr.Dropdown(model_ids, value=right, label="Model B", interactive=True)
    with gr.Row(equal_height=True):
        # Copy only: a column's trash icon would clear what it shows but not the session.
        chat_a = gr.Chatbot(label="A", height=360, elem_id="compare-a", buttons=["copy"])
        chat_b = gr.Chatbot(label="B", height=360, elem_id="compare-b", buttons=["copy"])
    prompt = gr.Textbox(label="Prompt", placeholder="Ask both models...", lines=2, elem_id="compare-prompt")
    with gr.Row():
        send = gr.Button(SEND_BUTTON, variant="primary")
        clear = gr.Button("Start over", variant="secondary")
    with gr.Accordion("Settings (both models)", open=False):
        # Labels unlike the chat tab's: a label finds one field on the page.
        system_prompt = gr.Textbox(label="Instructions for both models", lines=2)
        max_new_tokens = gr.Slider(
            1,
            settings.max_new_tokens_cap,
            value=min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_cap),
            step=1,
            label="Reply length in tokens",
        )
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature, 0 = greedy")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Nucleus (top-p)")
        seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed")
    with gr.Row():
        choice_buttons = [gr.Button(label, size="sm") for label in CHOICES]
        download = gr.DownloadButton(DOWNLOAD_BUTTON, value=None, size="sm", visible=False)
    marked = gr.Markdown()  # which reply was marked better, for the latest prompt
    session = gr.State([])  # one record per prompt sent

    async def compare(
        message: str,
        history_a: list[dict[str, Any]],
        history_b: list[dict[str, Any]],
        records: list[dict[str, Any]],
        first: str,
        second: str,
        system: str,
        tokens: float,
        temp: float,
        nucleus: float,
        noise_seed: float | None,
    ) -> AsyncGenerator[tuple[Any, ...], None]:
        if not message.strip():
            return
        params = SamplingParams(
            max_new_tokens=int(tokens),
            temperature=float(temp),
            top_p=float(nucleus),
            seed=None if noise_seed is None else int(noise_seed),
        )
        # Each column's conversation from the session's exact replies (the chat boxes only show them).
        conversations = [conversation(message, _history(records, side), system) for side in ("a", "b")]
        shown = [[*history, {"role": "user", "content": message}] for history in (history_a, history_b)]
        replies = ["", ""]
        async for replies in _stream_both(service, (first, second), conversations, params):
            yield gr.Textbox(), *_with_replies(shown, replies), records, gr.DownloadButton()
        record = {
            "prompt": message,
            "system_prompt": system or None,
            "settings": {"max_new_tokens": params.max_new_tokens, "temperature": temp, "top_p": nucleus},
            "seed": params.seed,
            "a": {"model": first, "reply": replies[0]},
            "b": {"model": second, "reply": replies[1]},
            "choice": None,
        }
        records = [*records, record]
        yield "", *_with_replies(shown, replies), records, _session_file(records)

    def choose(records: list[dict[str, Any]], label: str) -> tuple[list[dict[str, Any]], Any, str]:
        if not records:
            return records, gr.DownloadButton(), "Send a prompt first."
        records = [*records[:-1], {**records[-1], "choice": CHOICES[label]}]
        return records, _session_file(records), f"Prompt {len(records)} marked: {label}."

    inputs = [
        prompt,
        chat_a,
        chat_b,
        session,
        model_a,
        model_b,
        system_prompt,
        max_new_tokens,
        temperature,
        top_p,
        seed,
    ]
    outputs = [prompt, chat_a, chat_b, session, download]
    for event in (send.click, prompt.submit):
        event(compare, inputs, outputs, api_visibility="undocumented")
    for button in choice_buttons:
        button.click(choose, [session, button], [session, download, marked], api_visibility="undocumented")
    clear.click(
        lambda: ([], [], [], gr.DownloadButton(value=None, visible=False), ""),
        None,
        [chat_a, chat_b, session, download, marked],
        api_visibility="undocumented",
    )


async def _stream_both(
    service: ModelService, models: tuple[str, str], conversations: list[list[dict[str, str]]], params: SamplingParams
) -> AsyncGenerator[list[str], None]:
    """Both replies so far, after each new piece of either; a model that cannot answer says why in its column."""
    replies = ["", ""]
    pieces: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            chunks = service.stream_chat(conversations[index], params, wait=True, model=models[index])
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    await pieces.put((index, chunk.text))
        except (PromptTooLongError, InvalidRequestError, ModelNotReadyError, UnknownModelError) as error:
            await pieces.put((index, f"{NOT_ANSWERED}{error}"))
        finally:
            await pieces.put((index, None))

    tasks = [asyncio.create_task(pump(index)) for index in range(2)]
    try:
        finished = 0
        while finished < 2:
            index, text = await pieces.get()
            if text is None:
                finished += 1
                continue
            replies[index] += text
            yield list(replies)
    finally:
        for task in tasks:  # the page closed or Stop: both generations end
            task.cancel()


def _history(records: list[dict[str, Any]], side: str) -> list[dict[str, str]]:
    """One column's earlier turns: each prompt and that column's reply."""
    turns = []
    for record in records:
        turns += [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record[side]["reply"]},
        ]
    return turns


def _with_replies(shown: list[list[dict[str, Any]]], replies: list[str]) -> list[list[dict[str, Any]]]:
    return [[*history, {"role": "assistant", "content": reply}] for history, reply in zip(shown, replies, strict=True)]


def _session_file(records: list[dict[str, Any]]) -> Any:
    """The session as a JSONL file for the download button (Gradio copies it into its cache and serves it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="compare-session-", delete=False) as file:
        file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return gr.DownloadButton(value=file.name, visible=True)
