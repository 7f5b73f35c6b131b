"""Refusing a prompt too long for the model's context without blocking the event loop (which also answers /health).

A prompt far too long is refused by its character count, which costs nothing; one that might fit is tokenized on a
worker thread. ModelService.stream_chat then tokenizes the accepted prompt once more, on the event loop: the
character bound keeps that short.
"""

from __future__ import annotations

import asyncio

from inference_app.generation import Message, ModelService, PromptTooLongError

# More characters than any one token of Phi-3's vocabulary (the longest are runs of 16 spaces) or of the tests'
# tokenizer covers: a prompt with more characters than this many per token of context cannot fit.
MAX_CHARS_PER_TOKEN = 16


async def check_prompt_fits(service: ModelService, messages: list[Message]) -> None:
    """Raises PromptTooLongError if `messages` leave no room for a reply in the model's context, and
    ModelNotReadyError or ValueError as ModelService.stream_chat would."""
    context_length = int(service.info()["context_length"])
    characters = sum(len(message["content"]) for message in messages)
    if characters > context_length * MAX_CHARS_PER_TOKEN:
        raise PromptTooLongError(
            f"the conversation has {characters} characters, more than the model's context of {context_length} "
            "tokens can hold: shorten the conversation"
        )
    prompt_tokens = await asyncio.to_thread(service.count_prompt_tokens, messages)
    if prompt_tokens >= context_length:
        raise PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens and the model's context holds {context_length}: "
            "shorten the conversation"
        )
