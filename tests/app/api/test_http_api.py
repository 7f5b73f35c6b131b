"""The HTTP API against a real uvicorn on 127.0.0.1 serving the tiny model: health, readiness, models, chat
completions (plain and streamed), every invalid request's status and body, the concurrency limit and client
disconnects."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio_client
import httpx
import pytest

from inference_app.service import MAX_CHARS_PER_TOKEN, ModelService, SamplingParams
from inference_app.settings import AdapterOption, Settings
from inference_app.web.chat_history import NOT_ANSWERED
from inference_app.web.ui import CHAT_API_NAME
from tests.app.server_harness import (
    TINY_MODEL_INFO,
    RunningServer,
    app_process,
    engine_is_idle,
    running_server,
    sse_events,
    wait_for,
)
from tests.app.service_harness import collect_chunks
from tests.model_factory import ModelFolders

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(30.0)  # every request is bounded: an invalid one must never hang
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Tell me a story about a cat."},
]
# A prompt whose greedy reply from the tiny model runs past LONG_REPLY_TOKENS (checked by long_request):
# it keeps its generation slot busy for a while.
LONG_PROMPT = "Hello, world!"
LONG_REPLY_TOKENS = 200


@pytest.fixture(scope="module")
def server(tiny_settings: Settings) -> Iterator[RunningServer]:
    """One generation slot, so that a second request at once is over the limit."""
    with running_server(dataclasses.replace(tiny_settings, max_concurrent_generations=1)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def long_request(server: RunningServer) -> dict[str, Any]:
    """A greedy request that generates LONG_REPLY_TOKENS tokens unless stopped."""
    body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": LONG_REPLY_TOKENS, "temperature": 0}
    completion = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT).json()
    assert completion["choices"][0]["finish_reason"] == "length", "pick a prompt with a longer greedy reply"
    return body


def chat(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": CONVERSATION, **body})


def stream_chat(client: httpx.Client, **body: Any) -> tuple[httpx.Response, list[Any]]:
    with client.stream("POST", "/v1/chat/completions", json={"messages": CONVERSATION, "stream": True, **body}) as r:
        return r, list(sse_events(r))


def streamed_text(events: list[Any]) -> str:
    return "".join(
        event["choices"][0]["delta"].get("content", "")
        for event in events
        if isinstance(event, dict) and event["choices"]
    )


def direct_reply(service: ModelService, messages: list[dict[str, str]], **sampling: Any) -> str:
    """The reply ModelService gives without HTTP in between."""
    return "".join(chunk.text for chunk in collect_chunks(service, messages, SamplingParams(**sampling)))


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert (error["type"], error["param"], error["code"]) == (error_type, param, code)


# ---- health and readiness ----


def test_health_answers_while_loading_and_ready_turns_green_when_loaded(tiny_settings: Settings) -> None:
    with running_server(tiny_settings, start_loading=False) as server:
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        not_ready = httpx.get(f"{server.url}/ready")
        assert not_ready.status_code == 503
        assert not_ready.json() == {"status": "loading", "reason": "the model is still loading"}
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CONVERSATION})
        assert_error(response, 503, "service_unavailable", None, "model_loading")
        assert int(response.headers["retry-after"]) > 0

        server.service.start_loading()
        server.wait_until_ready()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{server.url}/ready").json() == {"status": "ready", **TINY_MODEL_INFO}


def test_ready_stays_red_with_the_reason_when_loading_fails(tiny_settings: Settings, tmp_path: Path) -> None:
    missing_adapter = tmp_path / "no-such-adapter"
    with running_server(
        dataclasses.replace(tiny_settings, adapters=(AdapterOption(None, missing_adapter),)), start_loading=False
    ) as server:
        server.service.start_loading()
        wait_for(lambda: server.service.status == "failed", 30, "loading to fail")
        assert httpx.get(f"{server.url}/health").status_code == 200
        not_ready = httpx.get(f"{server.url}/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] == "failed"
        assert str(missing_adapter) in not_ready.json()["reason"]
        assert "--adapter" in not_ready.json()["reason"]
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CONVERSATION})
        assert_error(response, 503, "service_unavailable", None, "model_failed")
        assert str(missing_adapter) in response.json()["error"]["message"]
        # Nothing is served: no model is listed.
        assert_error(httpx.get(f"{server.url}/v1/models"), 503, "service_unavailable", None, "model_failed")


def test_python_m_inference_app_serves_the_ui_and_the_api(model_folders: ModelFolders, tmp_path: Path) -> None:
    """The image's command, as a user runs it locally."""
    arguments = ["--model", str(model_folders.model_path), "--adapter", str(model_folders.adapter_path)]
    with app_process([*arguments, "--host", "127.0.0.1"], tmp_path / "server.log") as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "Phi-3-mini-4k-instruct-ft"
        body = {"messages": CONVERSATION, "max_tokens": 5, "temperature": 0}  # greedy: longer than 5 tokens
        completion = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert completion.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/config").json()["title"] == "Chat with Phi-3-mini-4k-instruct + LoRA adapter"


def test_models_lists_the_adapter_as_the_served_model(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = response.json()
    assert models["object"] == "list"
    assert [(model["id"], model["object"]) for model in models["data"]] == [
        ("Phi-3-mini-4k-instruct-ft", "model"),
        ("Phi-3-mini-4k-instruct", "model"),
    ]
    assert isinstance(models["data"][0]["created"], int)


def test_model_picks_the_base_or_the_adapter_and_an_unknown_one_gets_404(client: httpx.Client) -> None:
    replies = {}
    for model in ("Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct-ft"):
        completion = chat(client, model=model, max_tokens=8, temperature=0)
        assert completion.status_code == 200 and completion.json()["model"] == model
        replies[model] = completion.json()["choices"][0]["message"]["content"]
    assert len(set(replies.values())) == 2  # two different models answered
    unknown = chat(client, model="adapter", max_tokens=8)
    assert_error(unknown, 404, "invalid_request_error", "model", "model_not_found")
    assert "Phi-3-mini-4k-instruct, Phi-3-mini-4k-instruct-ft" in unknown.json()["error"]["message"]


def test_docs_page_loads_swagger_ui_from_the_app_itself(client: httpx.Client) -> None:
    """Offline, a page whose scripts come from a CDN is blank: every asset the page names is served here."""
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) == 3, assets
    for asset in assets:
        assert asset.startswith("/docs/assets/"), f"{asset} is not served by the app"
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert client.get("/docs/assets/other.js").status_code == 404


# ---- completions ----


def test_completion_templates_the_whole_conversation(client: httpx.Client, server: RunningServer) -> None:
    response = chat(client, max_tokens=12, temperature=0)
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "Phi-3-mini-4k-instruct-ft"
    [choice] = completion["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == direct_reply(server.service, CONVERSATION, max_new_tokens=12, temperature=0)
    assert choice["finish_reason"] == "length"
    prompt_tokens = server.service.count_prompt_tokens(CONVERSATION)
    assert prompt_tokens > server.service.count_prompt_tokens(CONVERSATION[-1:])
    assert completion["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


def test_streamed_completion_matches_the_plain_one(client: httpx.Client) -> None:
    expected = chat(client, max_tokens=15, temperature=0).json()

    response, events = stream_chat(client, max_tokens=15, temperature=0, stream_options={"include_usage": True})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert isinstance(usage_chunk, dict)
    assert all(isinstance(chunk, dict) and chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len(chunks) > 3, "the reply arrives in several chunks"
    assert streamed_text(events) == expected["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == expected["usage"]


def test_streamed_chunks_have_no_usage_unless_asked(client: httpx.Client) -> None:
    _, events = stream_chat(client, max_tokens=5, temperature=0)
    assert events[-1] == "[DONE]"
    assert all(event["usage"] is None and len(event["choices"]) == 1 for event in events[:-1])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_one_token_reply_ends_at_once_and_frees_its_slot(client: httpx.Client, stream: bool) -> None:
    # The first chunk is also the last one: the reply must still end (and the server's one slot be free again).
    for _ in range(2):
        if stream:
            _, events = stream_chat(client, max_tokens=1, stream_options={"include_usage": True})
            assert events[-1] == "[DONE]"
            finish_reason, usage = events[-3]["choices"][0]["finish_reason"], events[-2]["usage"]
        else:
            completion = chat(client, max_tokens=1).json()
            finish_reason, usage = completion["choices"][0]["finish_reason"], completion["usage"]
        assert finish_reason in ("length", "stop")
        assert usage["completion_tokens"] <= 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
def test_stop_sequence_ends_the_reply_before_it(client: httpx.Client, stream: bool, as_list: bool) -> None:
    full = chat(client, max_tokens=30, temperature=0).json()["choices"][0]["message"]["content"]
    stop = full[10:13]
    assert stop.strip(), "the stop sequence should be visible text"
    body = {"max_tokens": 30, "temperature": 0, "stop": [stop, "never appears"] if as_list else stop}
    if stream:
        _, events = stream_chat(client, **body)
        text, finish_reason = streamed_text(events), events[-2]["choices"][0]["finish_reason"]
    else:
        choice = chat(client, **body).json()["choices"][0]
        text, finish_reason = choice["message"]["content"], choice["finish_reason"]
    assert text == full[: full.index(stop)]
    assert finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client: httpx.Client) -> None:
    def sample(seed: int) -> str:
        body = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": seed}
        return chat(client, **body).json()["choices"][0]["message"]["content"]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_top_p_zero_is_greedy_and_unknown_fields_are_ignored(client: httpx.Client) -> None:
    greedy = chat(client, max_tokens=10, temperature=0).json()
    response = chat(client, max_tokens=10, top_p=0, user="someone", presence_penalty=0)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"] == greedy["choices"][0]["message"]
    assert response.json()["model"] == "Phi-3-mini-4k-instruct-ft"


def test_openai_content_parts_and_developer_role_are_accepted(client: httpx.Client) -> None:
    messages = [
        {"role": "developer", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me a story"}, {"type": "text", "text": "about a cat."}],
        },
    ]
    flattened = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a story\nabout a cat."},
    ]
    plain = client.post("/v1/chat/completions", json={"messages": flattened, "max_tokens": 8, "temperature": 0})
    parts = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert parts.status_code == 200
    assert parts.json()["choices"] == plain.json()["choices"]
    assert parts.json()["usage"] == plain.json()["usage"]


# ---- invalid requests ----

USER = [{"role": "user", "content": "Hello"}]
INVALID_REQUESTS = {
    # id: (body, param, code)
    "not-json": ('{"messages": [', None, "invalid_json"),
    "not-utf8": (b'{"messages": "\xff"}', None, "invalid_json"),
    "not-an-object": ("[1, 2]", None, "invalid_json"),
    "no-messages": ({"max_tokens": 5}, "messages", "missing_required_parameter"),
    "empty-messages": ({"messages": []}, "messages", "invalid_value"),
    "messages-not-a-list": ({"messages": "Hello"}, "messages", "invalid_value"),
    "null-content": ({"messages": [{"role": "user", "content": None}]}, "messages[0]", "invalid_value"),
    "unknown-role": ({"messages": [*USER, {"role": "robot", "content": "x"}]}, "messages[1].role", "invalid_value"),
    "no-content": ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    "image-content": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        "invalid_value",
    ),
    "negative-max-tokens": ({"messages": USER, "max_tokens": -1}, "max_tokens", "invalid_value"),
    "zero-max-tokens": ({"messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    "negative-max-completion-tokens": (
        {"messages": USER, "max_completion_tokens": -5},
        "max_completion_tokens",
        "invalid_value",
    ),
    "temperature-too-high": ({"messages": USER, "temperature": 2.5}, "temperature", "invalid_value"),
    "temperature-negative": ({"messages": USER, "temperature": -0.1}, "temperature", "invalid_value"),
    "top-p-too-high": ({"messages": USER, "top_p": 1.5}, "top_p", "invalid_value"),
    "top-k-zero": ({"messages": USER, "top_k": 0}, "top_k", "invalid_value"),
    # top_k is bounded by the model's vocabulary: 2**63 overflowed on the device and failed every request prefilled
    # with it (400 blamed on messages)
    "top-k-beyond-the-vocabulary": ({"messages": USER, "top_k": 10**6}, "top_k", "invalid_value"),
    "top-k-beyond-64-bits": ({"messages": USER, "top_k": 2**63}, "top_k", "invalid_value"),
    # Python's JSON parser takes NaN and Infinity
    "temperature-nan": (
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "temperature",
        "invalid_value",
    ),
    "top-p-infinite": (
        '{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        "top_p",
        "invalid_value",
    ),
    "too-many-choices": ({"messages": USER, "n": 9}, "n", "invalid_value"),
    "no-choices": ({"messages": USER, "n": 0}, "n", "invalid_value"),
    "five-stops": ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    "tool-without-function": (
        {"messages": USER, "tools": [{"type": "function"}]},
        "tools[0].function",
        "missing_required_parameter",
    ),
    "functions": ({"messages": USER, "functions": [{"name": "f"}]}, "functions", "invalid_value"),
    # strict types, as OpenAI: nothing is coerced
    "stream-string": ({"messages": USER, "stream": "yes"}, "stream", "invalid_value"),
    "max-tokens-string": ({"messages": USER, "max_tokens": "10"}, "max_tokens", "invalid_value"),
    "max-tokens-bool": ({"messages": USER, "max_tokens": True}, "max_tokens", "invalid_value"),
    "max-tokens-float": ({"messages": USER, "max_tokens": 10.5}, "max_tokens", "invalid_value"),
    "n-bool": ({"messages": USER, "n": True}, "n", "invalid_value"),
    "temperature-bool": ({"messages": USER, "temperature": True}, "temperature", "invalid_value"),
    "temperature-string": ({"messages": USER, "temperature": "0.5"}, "temperature", "invalid_value"),
    "top-p-null": ({"messages": USER, "top_p": None}, "top_p", "invalid_value"),
    "content-number": ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "invalid_value"),
    "stop-number": ({"messages": USER, "stop": 7}, "stop", "invalid_value"),
    "include-usage-string": (
        {"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
        "invalid_value",
    ),
    "seed-above-signed-64-bits": ({"messages": USER, "seed": 2**63}, "seed", "invalid_value"),
    "seed-below-64-bits": ({"messages": USER, "seed": -(2**63) - 1}, "seed", "invalid_value"),
    "seed-string": ({"messages": USER, "seed": "7"}, "seed", "invalid_value"),
    # what this server cannot honour is refused, not ignored
    "unknown-response-format": (
        {"messages": USER, "response_format": {"type": "xml"}},
        "response_format.type",
        "invalid_value",
    ),
    "json-schema-without-schema": (
        {"messages": USER, "response_format": {"type": "json_schema"}},
        "response_format",
        "invalid_value",
    ),
    "schema-feature-not-enforced": (
        {
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        },
        "response_format.json_schema.schema",
        "unsupported_schema",
    ),
    "tool-schema-feature-not-enforced": (
        {
            "messages": USER,
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "dependentSchemas": {"a": {}}}},
                }
            ],
        },
        "tools",
        "unsupported_schema",
    ),
    "tool-choice-required-without-tools": (
        {"messages": USER, "tool_choice": "required"},
        "tool_choice",
        "invalid_value",
    ),
    "tool-choice-unknown-function": (
        {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tool_choice",
        "invalid_value",
    ),
    "json-mode-with-tools": (
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
        },
        "response_format",
        "invalid_value",
    ),
    "logit-bias-not-a-token-id": ({"messages": USER, "logit_bias": {"hello": 1}}, "logit_bias", "invalid_value"),
    "logit-bias-out-of-range": ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    "logit-bias-beyond-the-vocabulary": (
        {"messages": USER, "logit_bias": {"50256": -100}},
        "logit_bias",
        "invalid_value",
    ),
    "penalty-out-of-range": ({"messages": USER, "presence_penalty": 3}, "presence_penalty", "invalid_value"),
    "frequency-penalty-out-of-range": (
        {"messages": USER, "frequency_penalty": -2.5},
        "frequency_penalty",
        "invalid_value",
    ),
    "top-logprobs-without-logprobs": ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    "top-logprobs-over-20": ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    "stream-options-without-stream": (
        {"messages": USER, "stream_options": {"include_usage": True}},
        "stream_options",
        "invalid_value",
    ),
    # malformed input never reaches the engine as a 500
    "lone-surrogate": (
        '{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "messages[0].content",
        "invalid_value",
    ),
    "lone-surrogate-streamed": (
        '{"messages": [{"role": "user", "content": "\\udfff"}], "stream": true}',
        "messages[0].content",
        "invalid_value",
    ),
    "lone-surrogate-in-stop": (
        '{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}',
        "stop",
        "invalid_value",
    ),
    "nested-1000-deep": ('{"messages": ' + "[" * 1000 + "]" * 1000 + "}", None, "invalid_json"),
    "nested-1000-deep-streamed": (
        '{"stream": true, "messages": ' + "[" * 1000 + "]" * 1000 + "}",
        None,
        "invalid_json",
    ),
    "nested-content-900-deep": (
        '{"messages": [{"role": "user", "content": ' + "[" * 900 + "]" * 900 + "}]}",
        "messages[0].content",
        "invalid_value",
    ),
    "prompt-too-long": (
        {"messages": [{"role": "user", "content": "word " * 600}]},
        "messages",
        "context_length_exceeded",
    ),
    "prompt-too-long-streamed": (
        {"messages": [{"role": "user", "content": "word " * 600}], "stream": True},
        "messages",
        "context_length_exceeded",
    ),
    # more characters, or more messages, than the context could hold whatever the tokens: refused before tokenizing
    "more-than-2048-messages": ({"messages": [{"role": "user", "content": ""}] * 2049}, "messages", "invalid_value"),
    "more-messages-than-the-context-has-tokens": (
        {"messages": [{"role": "user", "content": ""}] * 513},
        "messages",
        "context_length_exceeded",
    ),
    "prompt-far-too-long": (
        {"messages": [{"role": "user", "content": "x" * (512 * MAX_CHARS_PER_TOKEN + 1)}]},
        "messages",
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize(("body", "param", "code"), INVALID_REQUESTS.values(), ids=INVALID_REQUESTS.keys())
def test_invalid_request_gets_400_with_an_openai_error(
    client: httpx.Client, server: RunningServer, body: Any, param: str | None, code: str
) -> None:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", param, code)
    assert engine_is_idle(server.service)


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_not_sent_as_json_gets_415(
    client: httpx.Client, server: RunningServer, content_type: str | None
) -> None:
    """What a page on another site can send without a CORS preflight is refused, even when it parses as JSON."""
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
    response = client.post("/v1/chat/completions", content=body, headers=headers)
    assert_error(response, 415, "invalid_request_error", None, "unsupported_media_type")
    assert "Content-Type: application/json" in response.json()["error"]["message"]
    assert engine_is_idle(server.service)
    charset = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200


def test_an_unexpected_failure_is_a_500_with_an_openai_error_and_no_details(
    client: httpx.Client, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.service, "stream_chat", fail)
    response = chat(client, max_tokens=3)
    assert_error(response, 500, "server_error", None, None)
    assert "secret internal detail" not in response.text


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/completions"), ("HEAD", "/v1/embeddings")])
def test_unknown_api_url_gets_404_with_an_openai_error(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, json={"prompt": "Hello"})
    assert response.status_code == 404
    if method != "HEAD":
        assert_error(response, 404, "invalid_request_error", None, "unknown_url")
        assert f"{method} {path}" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/models", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/ready", "GET, HEAD"),
    ],
)
def test_a_known_path_asked_with_another_method_gets_405(
    client: httpx.Client, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    assert_error(response, 405, "invalid_request_error", None, "method_not_allowed")
    assert response.headers["allow"] == allowed


def test_head_is_answered_like_get_without_a_body(client: httpx.Client) -> None:
    for path in ["/health", "/ready", "/v1/models", "/openapi.json"]:
        head, get = client.head(path), client.get(path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"]


def test_invalid_request_leaves_the_slot_free(client: httpx.Client) -> None:
    for body, _, _ in INVALID_REQUESTS.values():
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        client.post("/v1/chat/completions", content=content)
    assert chat(client, max_tokens=3).status_code == 200  # the server has one slot: none was leaked


# ---- concurrency and disconnects ----


@pytest.mark.usefixtures("paced_decoding")
def test_request_over_the_limit_gets_429_with_retry_after(
    client: httpx.Client, server: RunningServer, long_request: dict[str, Any]
) -> None:
    with client.stream("POST", "/v1/chat/completions", json={**long_request, "stream": True}) as running:
        events = sse_events(running)
        assert next(events)["choices"][0]["delta"]["role"] == "assistant"  # the one slot is taken

        response = chat(client, max_tokens=3)
        assert_error(response, 429, "rate_limit_error", None, "rate_limit_exceeded")
        assert int(response.headers["retry-after"]) >= 1
        streamed_response = chat(client, max_tokens=3, stream=True)
        assert_error(streamed_response, 429, "rate_limit_error", None, "rate_limit_exceeded")

        rest = list(events)  # the running reply is not disturbed
        assert rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert chat(client, max_tokens=3).status_code == 200


@pytest.mark.usefixtures("paced_decoding")
def test_disconnect_during_a_stream_stops_the_generation(
    client: httpx.Client, server: RunningServer, long_request: dict[str, Any]
) -> None:
    steps_before = server.service.generation_stats()["decode_steps"]
    with client.stream("POST", "/v1/chat/completions", json={**long_request, "stream": True}) as running:
        events = sse_events(running)
        next(events)
        next(events)  # the reply is being generated
    # Leaving the block closes the connection before the reply is complete.
    wait_for(lambda: engine_is_idle(server.service), 10, "the generation to stop")
    steps = server.service.generation_stats()["decode_steps"] - steps_before
    assert steps < LONG_REPLY_TOKENS / 2, f"{steps} decode steps: the generation ran on after the client left"
    assert chat(client, max_tokens=3).status_code == 200  # its slot is free


@pytest.mark.usefixtures("paced_decoding")
def test_disconnect_while_waiting_for_a_plain_reply_stops_the_generation(
    server: RunningServer, long_request: dict[str, Any]
) -> None:
    steps_before = server.service.generation_stats()["decode_steps"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=long_request, timeout=httpx.Timeout(10, read=0.1))
    wait_for(lambda: engine_is_idle(server.service), 10, "the generation to stop")
    steps = server.service.generation_stats()["decode_steps"] - steps_before
    assert steps < LONG_REPLY_TOKENS / 2, f"{steps} decode steps: the generation ran on after the client left"
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 3}, timeout=TIMEOUT
    )
    assert response.status_code == 200


@pytest.mark.usefixtures("paced_decoding")
def test_the_limit_per_client_refuses_one_more_from_that_client_only(
    tiny_settings: Settings, long_request: dict[str, Any]
) -> None:
    """--max-generations-per-client 1: a client (an address) running a reply gets 429 for a second one, in the API
    and in the UI, while another client (here behind the trusted proxy 127.0.0.1) is served."""
    with (
        running_server(dataclasses.replace(tiny_settings, max_generations_per_client=1)) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
        client.stream("POST", "/v1/chat/completions", json={**long_request, "stream": True}) as running,
    ):
        events = sse_events(running)
        next(events)  # the client's one generation runs
        second = chat(client, max_tokens=3)
        assert_error(second, 429, "rate_limit_error", None, "rate_limit_exceeded")
        assert "--max-generations-per-client" in second.json()["error"]["message"]
        ui_reply = gradio_client.Client(server.url, verbose=False).predict(
            "Hello", "", 3, 0.0, 1.0, 0, api_name=f"/{CHAT_API_NAME}"
        )
        assert ui_reply.startswith(NOT_ANSWERED) and "--max-generations-per-client" in ui_reply
        other_client = client.post(
            "/v1/chat/completions",
            json={"messages": CONVERSATION, "max_tokens": 3},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert other_client.status_code == 200, other_client.text
        assert list(events)[-1] == "[DONE]"
        assert chat(client, max_tokens=3).status_code == 200  # the finished reply no longer counts


# ---- shutdown ----


@pytest.mark.usefixtures("paced_decoding")
def test_replies_running_at_shutdown_end_with_an_error_the_client_can_read(
    tiny_settings: Settings, long_request: dict[str, Any]
) -> None:
    """SIGTERM (here what its handler does): after the grace period (STREAMS_END_AFTER_S in the harness), a stream
    gets an error event and a plain reply a 503, instead of a connection cut without a word."""
    with running_server(tiny_settings) as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=long_request, timeout=TIMEOUT)
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**long_request, "stream": True}, timeout=TIMEOUT
        ) as response:
            events = sse_events(response)
            next(events)
            next(events)  # the reply is being generated
            wait_for(lambda: server.service.generation_stats()["running"] == 2, 10, "both replies to run")
            server.server.should_exit = True
            rest = list(events)
        assert rest[-1]["error"]["code"] == "server_shutting_down", rest[-1]
        assert "[DONE]" not in rest
        assert_error(plain.result(), 503, "service_unavailable", None, "server_shutting_down")


def test_a_server_on_loopback_answers_only_to_loopback_host_names(client: httpx.Client) -> None:
    """A page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name as Host: refused."""
    for host in ["rebound.evil.example", "rebound.evil.example:7860", "192.168.1.20"]:
        assert client.get("/v1/models", headers={"Host": host}).status_code == 400, host
    for host in ["localhost", "localhost:7860", "127.0.0.1:7860"]:
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
