"""Refusing a prompt far too long for the model's context before it is tokenized.

Tokenizing megabytes of text takes seconds; the character count costs nothing. A prompt that passes is tokenized by
ModelService.stream_chat on a worker thread, so the event loop (which also answers /health) never waits for it.
"""

from __future__ import annotations

from inference_app.service import Message, ModelService, PromptTooLongError

# More characters than any one token of Phi-3's vocabulary (the longest are runs of 16 spaces) or of the tests'
# tokenizer covers: a prompt with more characters than this many per token of context cannot fit.
MAX_CHARS_PER_TOKEN = 16


def refuse_overlong_prompt(service: ModelService, messages: list[Message]) -> None:
    """Raises PromptTooLongError if `messages` have more characters than the model's context could hold as tokens,
    and ModelNotReadyError while the model is not loaded."""
    context_length = int(service.info()["context_length"])
    characters = sum(len(message["content"]) for message in messages)
    if characters > context_length * MAX_CHARS_PER_TOKEN:
        raise PromptTooLongError(
            f"the conversation has {characters} characters, more than the model's context of {context_length} "
            "tokens can hold: shorten the conversation"
        )
