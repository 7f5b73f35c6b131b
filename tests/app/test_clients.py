"""Clients nobody here wrote, against the real server: the official `openai` package, LangChain's ChatOpenAI and
`gradio_client`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from gradio_client import Client
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, SecretStr
from transformers import AutoTokenizer

from inference_app.service import SamplingParams
from inference_app.settings import Settings
from inference_app.web.ui import CHAT_API_NAME, NOT_ANSWERED
from tests.app.server_harness import RunningServer, running_server
from tests.app.service_harness import collect_chunks

SERVED_MODEL = "Phi-3-mini-4k-instruct-ft"  # the tiny model's adapter, as a bare --adapter PATH is named

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
        SERVED_MODEL,
        "Phi-3-mini-4k-instruct",
    ]


def test_openai_chat_completion(openai_client: openai.OpenAI, server: RunningServer) -> None:
    completion = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=MESSAGES, max_tokens=16, temperature=0
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
        model=SERVED_MODEL,
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
        model=SERVED_MODEL, messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop]
    )
    assert completion.choices[0].message.content == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_openai_sees_a_bad_request_as_such(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, temperature=3)
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


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        ("16, NaN, 0.95, 0", "temperature"),
        ("16, 0.7, NaN, 0", "top_p"),
        ("NaN, 0.7, 0.95, 0", "max_new_tokens"),
        ("16, 0.7, 0.95, NaN", "top_k"),
    ],
)
def test_the_ui_endpoint_refuses_a_nan_setting_naming_it(server: RunningServer, settings: str, param: str) -> None:
    """The sliders never hold NaN, but the UI's API takes any JSON number (gradio_client cannot send NaN; a script
    can): the service refuses what the API refuses, and the chat says so."""
    call = f"{server.url}/gradio_api/call/{CHAT_API_NAME}"
    body = '{"data": ["Tell me a story about a cat.", "", ' + settings + "]}"
    started = httpx.post(call, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert started.status_code == 200, started.text
    events = httpx.get(f"{call}/{started.json()['event_id']}", timeout=30).text
    answer = json.loads(events.split("event: complete\ndata: ")[1].splitlines()[0])[0]
    assert answer.startswith(NOT_ANSWERED), answer[:200]
    assert f"'{param}'" in answer


# ---- structured outputs, tool calls and the sampling extras, from the real clients ----


# Bounded fields: the random model's strings would otherwise run past any token budget. No docstring: LangChain sends
# it as the tool's description, and the tiny model's 512-token context has little room for the tools.
class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog"]


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
USER: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def langchain_model(server: RunningServer) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{server.url}/v1", api_key=SecretStr("unused"), model=SERVED_MODEL, max_retries=0, timeout=30
    )


def assert_weather_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and len(arguments["city"]) <= 10 and arguments["unit"] in ("C", "F")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_parse_returns_the_schemas_object(openai_client: openai.OpenAI, temperature: float) -> None:
    completion = openai_client.chat.completions.parse(
        model=SERVED_MODEL, messages=USER, response_format=Person, max_tokens=60, temperature=temperature, seed=1
    )
    [choice] = completion.choices
    assert isinstance(choice.message.parsed, Person)
    assert choice.finish_reason == "stop"


def test_openai_streamed_json_mode_is_one_json_object(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, response_format={"type": "json_object"}, max_tokens=80, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_openai_refuses_a_schema_feature_the_engine_cannot_enforce(openai_client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "tags", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=SERVED_MODEL, messages=USER, response_format=response_format)
    assert raised.value.param == "response_format.json_schema.schema"
    assert "uniqueItems" in str(raised.value.message)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_forced_tool_call(openai_client: openai.OpenAI, tool_choice: Any) -> None:
    completion = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=60
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert_weather_call(call)


def test_openai_streamed_tool_call_and_the_conversation_that_follows(
    openai_client: openai.OpenAI, server: RunningServer
) -> None:
    stream = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60, stream=True
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [call] = deltas
    assert_weather_call(call)
    # The call and its result go back into the conversation; the next reply is text again (tool_choice none).
    history: list[Any] = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude={"index"})]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    reply = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )
    assert reply.choices[0].message.tool_calls is None
    assert call.function is not None and call.function.arguments is not None
    rendered = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": json.dumps({"name": "get_weather", "arguments": json.loads(call.function.arguments)}),
        },
        {"role": "user", "content": f"Result of get_weather (call {call.id}): Sunny, 21 C"},
    ]
    assert reply.usage is not None and reply.usage.prompt_tokens == server.service.count_prompt_tokens(rendered)


def test_openai_auto_tool_choice_calls_when_the_reply_starts_as_a_call(
    openai_client: openai.OpenAI, tiny_settings: Settings
) -> None:
    """ "auto" lets the reply be text or a call; a bias towards "{" makes the random model start a call."""
    brace = AutoTokenizer.from_pretrained(tiny_settings.model_path).convert_tokens_to_ids("{")
    called = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, tools=[WEATHER_TOOL], max_tokens=60, logit_bias={str(brace): 100}
    )
    assert called.choices[0].finish_reason == "tool_calls"
    assert_weather_call((called.choices[0].message.tool_calls or [])[0])
    text = openai_client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, tools=[WEATHER_TOOL], max_tokens=8, logit_bias={str(brace): -100}
    )
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_openai_logprobs_and_several_choices(openai_client: openai.OpenAI, stream: bool) -> None:
    request: Any = {
        "model": SERVED_MODEL,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0.8,
        "seed": 11,
        "n": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    if stream:
        chunks = list(
            openai_client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        )
        usage = chunks[-1].usage
        by_choice: dict[int, list[Any]] = {0: [], 1: [], 2: []}
        for chunk in chunks:
            for choice in chunk.choices:
                by_choice[choice.index].extend(choice.logprobs.content or [] if choice.logprobs else [])
        entries = list(by_choice.values())
    else:
        completion = openai_client.chat.completions.create(**request)
        usage = completion.usage
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        entries = [choice.logprobs.content or [] if choice.logprobs else [] for choice in completion.choices]
    assert usage is not None and usage.completion_tokens == 18, "usage counts every choice's tokens"
    for choice_entries in entries:
        assert len(choice_entries) == 6
        for entry in choice_entries:
            assert entry.logprob <= 0 and 1 <= len(entry.top_logprobs) <= 2
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4
    assert len({tuple(entry.token for entry in choice_entries) for choice_entries in entries}) > 1


def test_openai_retrieves_the_served_model(openai_client: openai.OpenAI) -> None:
    assert openai_client.models.retrieve(SERVED_MODEL).id == SERVED_MODEL
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(langchain_model: ChatOpenAI, method: str) -> None:
    structured = langchain_model.bind(max_tokens=100).with_structured_output(Person, method=method, strict=True)
    assert isinstance(structured.invoke("Describe a person."), Person)


def test_langchain_structured_output_json_mode(server: RunningServer, tiny_settings: Settings) -> None:
    """JSON mode guarantees an object, not its length: a bias towards "}" lets the random model close it in time
    (with_structured_output drops what .bind() added, so the settings are the model's own)."""
    close = AutoTokenizer.from_pretrained(tiny_settings.model_path).convert_tokens_to_ids("}")
    assert isinstance(close, int)
    model = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key=SecretStr("unused"),
        model=SERVED_MODEL,
        max_retries=0,
        timeout=30,
        max_completion_tokens=80,
        logit_bias={close: 100},
    )
    structured = model.with_structured_output(None, method="json_mode")
    assert isinstance(structured.invoke("Reply in JSON."), dict)


def test_langchain_bind_tools_with_a_forced_tool(langchain_model: ChatOpenAI) -> None:
    model = langchain_model.bind_tools([WEATHER_TOOL], tool_choice="get_weather").bind(max_tokens=60)
    message = model.invoke("What is the weather?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
