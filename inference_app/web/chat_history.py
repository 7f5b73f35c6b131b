"""From a Gradio chat's history to the messages a model is prompted with (the chat tab and the compare tab)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from inference_app.api.protocol import flatten_text_content

NOT_ANSWERED = "⚠️ Not answered: "  # starts a reply that explains why the model did not answer: not the model's words


def conversation(message: str, history: Sequence[Mapping[str, Any]], system_prompt: str | None) -> list[dict[str, str]]:
    """The messages to template: system prompt, earlier turns, the new message.

    Gradio 6 sends each earlier turn's content as a list of {"type": "text", "text": ...} blocks; the chat
    template needs a string. Errors shown in the chat (NOT_ANSWERED) are not the model's words: left out.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    for turn in history:
        content = flatten_text_content(turn["content"])
        if turn["role"] in ("user", "assistant") and not content.startswith(NOT_ANSWERED):
            messages.append({"role": turn["role"], "content": content})
    messages.append({"role": "user", "content": message})
    return messages
