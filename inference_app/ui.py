"""The Gradio chat UI: a multi-turn chat with streamed replies, through the same ModelService.stream_chat as the API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import gradio as gr

from inference_app.api_schema import flatten_text_content
from inference_app.generation import ModelNotReadyError, ModelService, PromptTooLongError, SamplingParams
from inference_app.settings import Settings

CHAT_API_NAME = "chat"  # gradio_client: Client(url).predict(message, system_prompt, ..., api_name="/chat")
EXAMPLES = [
    ["Write a haiku about the sea."],
    ["Explain in one sentence what a LoRA adapter is."],
]
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95


def build_ui(settings: Settings, service: ModelService) -> gr.Blocks:
    async def respond(
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
    ) -> AsyncGenerator[str, None]:
        params = SamplingParams(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k) or None,  # 0 on the slider: no top-k filtering
        )
        reply = ""
        # wait=True: a request beyond the generation slots waits (Gradio's queue already bounds how many run).
        chunks = service.stream_chat(conversation(message, history, system_prompt), params, wait=True)
        async with contextlib.aclosing(chunks):  # the stop button or a closed tab cancels us: stop generating
            try:
                async for chunk in chunks:
                    reply += chunk.text
                    yield reply
            except (PromptTooLongError, ModelNotReadyError) as error:
                raise gr.Error(str(error)) from error

    return gr.ChatInterface(
        respond,
        title=f"Chat with {settings.model_id}" + ("" if settings.adapter_id is None else " + LoRA adapter"),
        description=_header(settings),
        additional_inputs=[
            gr.Textbox(label="System prompt", lines=2, placeholder="Optional instructions for the model"),
            gr.Slider(
                1,
                settings.max_new_tokens_cap,
                value=min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_cap),
                step=1,
                label="Max new tokens",
            ),
            gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p"),
            gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        examples=EXAMPLES,
        api_name=CHAT_API_NAME,
        analytics_enabled=False,  # the app runs offline in tests and must not phone home
    ).queue(default_concurrency_limit=settings.max_concurrent_generations)


def conversation(message: str, history: Sequence[Mapping[str, Any]], system_prompt: str | None) -> list[dict[str, str]]:
    """The messages to template: system prompt, earlier turns, the new message.

    Gradio 6 sends each earlier turn's content as a list of {"type": "text", "text": ...} blocks; the chat
    template needs a string.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    messages += [
        {"role": turn["role"], "content": flatten_text_content(turn["content"])}
        for turn in history
        if turn["role"] in ("user", "assistant")
    ]
    messages.append({"role": "user", "content": message})
    return messages


def _header(settings: Settings) -> str:
    served = f"API model id `{settings.served_model_id}` at `/v1/chat/completions`."
    if settings.adapter_id is None:
        return f"Base model `{settings.model_path}` without an adapter (`--base-only`). {served}"
    return f"Base model `{settings.model_path}` with the LoRA adapter `{settings.adapter_path}`. {served}"
