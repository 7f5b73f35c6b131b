"""Clients nobody here wrote, against the real server: the official `openai` package and `gradio_client`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from gradio_client import Client

from inference_app.service import SamplingParams
from inference_app.settings import Settings
from inference_app.web.ui import CHAT_API_NAME
from tests.app.server_harness import RunningServer, running_server
from tests.app.service_harness import collect_chunks

pytestmark = pytest.mark.slow

MESSAGES: list[Any] = [  # Any: the openai package wants its own TypedDicts
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a story about a cat."},
]


@pytest.fixture(scope="module")
def server(tiny_settings: Settings) -> Iterator[RunningServer]:
    with running_server(tiny_settings) as running:
        yield running


@pytest.fixture
def openai_client(server: RunningServer) -> Iterator[openai.OpenAI]:
    # No retries: a failure must show, not be retried away.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


def greedy_reply(server: RunningServer, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    chunks = collect_chunks(server.service, messages, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    return "".join(chunk.text for chunk in chunks)


def test_openai_lists_the_served_model(openai_client: openai.OpenAI) -> None:
    assert [model.id for model in openai_client.models.list()] == [
        "Phi-3-mini-4k-instruct-ft",
        "Phi-3-mini-4k-instruct",
    ]


def test_openai_chat_completion(openai_client: openai.OpenAI, server: RunningServer) -> None:
    completion = openai_client.chat.completions.create(
        model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, max_tokens=16, temperature=0
    )
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_reply(server, MESSAGES, 16)
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 16
    assert completion.usage.prompt_tokens == server.service.count_prompt_tokens(MESSAGES)


def test_openai_streamed_chat_completion(openai_client: openai.OpenAI, server: RunningServer) -> None:
    stream = openai_client.chat.completions.create(
        model="Phi-3-mini-4k-instruct-ft",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([text for text in texts if text]) > 3, "the reply arrives in pieces"
    assert "".join(texts) == greedy_reply(server, MESSAGES, 16)
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_openai_stop_sequence(openai_client: openai.OpenAI, server: RunningServer) -> None:
    full = greedy_reply(server, MESSAGES, 30)
    stop = full[8:11]
    completion = openai_client.chat.completions.create(
        model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop]
    )
    assert completion.choices[0].message.content == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_openai_sees_a_bad_request_as_such(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, temperature=3)
    assert raised.value.status_code == 400
    assert raised.value.param == "temperature"
    assert raised.value.code == "invalid_value"
    assert raised.value.type == "invalid_request_error"


def test_gradio_client_chats_through_the_ui_endpoint(server: RunningServer) -> None:
    """Two turns through the UI's chat endpoint: the client's session keeps the history, like the browser's."""
    client = Client(server.url, verbose=False, download_files=False)
    settings = (
        "You are a helpful assistant.",
        16,
        0,
        0.95,
        0,
    )  # system prompt, max new tokens, greedy, top-p, top-k off
    try:
        first = client.predict("Tell me a story about a cat.", *settings, api_name=f"/{CHAT_API_NAME}")
        second = client.predict("And one about a dog?", *settings, api_name=f"/{CHAT_API_NAME}")
    finally:
        client.close()
    assert first == greedy_reply(server, MESSAGES, 16)
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And one about a dog?"},
    ]
    assert second == greedy_reply(server, conversation, 16)
