"""Generation through ModelService: streaming, sampling, stop strings, limits, concurrency and batching."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from inference_app import service as service_module
from inference_app.engine.model_loading import load_model
from inference_app.service import (
    MAX_MESSAGES,
    CapacityExceededError,
    GenerationChunk,
    InvalidRequestError,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
    plain_template_prompt,
)
from inference_app.settings import AdapterOption, Settings
from tests.model_factory import SIZES, ModelFolders
from tests.server_process import wait_for

Reply = Callable[..., list[GenerationChunk]]
StartService = Callable[..., ModelService]
PROMPT = "Hello, world! Tell me a story."
# Different lengths, so that a batch needs left padding.
PROMPTS = ("x", "What is the capital of France?", PROMPT * 4, "Write a haiku about the sea.")


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


# ---- streaming and correctness ----


def test_streams_chunks_and_counts_tokens(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    chunks = reply(service, PROMPT, max_new_tokens=12)
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 12
    assert len(chunks) > 3
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)
    assert {chunk.prompt_tokens for chunk in chunks} == {service.count_prompt_tokens(user(PROMPT))}


def test_greedy_reply_matches_transformers_generate(
    start_service: StartService, reply: Reply, tiny_settings: Settings
) -> None:
    service = start_service()
    reference = load_model(tiny_settings)
    inputs: Any = reference.tokenizer.apply_chat_template(
        user(PROMPT), add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    output = reference.model.generate(**inputs, max_new_tokens=30, do_sample=False)
    expected = reference.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text_of(reply(service, PROMPT, max_new_tokens=30)) == expected


def test_whole_conversation_goes_through_the_chat_template(start_service: StartService) -> None:
    service = start_service()
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(service.settings.model_path)
    text = str(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    assert text.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>")
    assert service.count_prompt_tokens(conversation) == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_plain_prompt_template(start_service: StartService, reply: Reply) -> None:
    template = "### Question: {}\n### Answer:"
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Tell me a story"},
    ]
    assert plain_template_prompt(conversation, template) == (
        "### Question: Hello\n### Answer:\nHi\n### Question: Tell me a story\n### Answer:"
    )
    service = start_service(prompt_template=template)
    tokenizer = AutoTokenizer.from_pretrained(service.settings.model_path)
    prompt = plain_template_prompt(conversation, template)
    assert service.count_prompt_tokens(conversation) == len(tokenizer(prompt)["input_ids"])
    assert reply(service, conversation, max_new_tokens=3)[-1].prompt_tokens == len(tokenizer(prompt)["input_ids"])


def test_bad_messages_are_refused_naming_the_message(start_service: StartService) -> None:
    service = start_service()
    with pytest.raises(InvalidRequestError, match="role") as refused:
        service.count_prompt_tokens([{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}])
    assert refused.value.param == "messages[1]"


BAD_SAMPLING: dict[str, list[Any]] = {
    "max_new_tokens": [0, -1],
    "temperature": [-0.1, 2.5, math.nan, math.inf, -math.inf],
    "top_p": [-0.1, 1.5, math.nan, math.inf],
    "top_k": [0, -1],
    "seed": [2**64, -(2**63) - 1],
}


@pytest.mark.parametrize(
    ("param", "value"), [(param, value) for param, values in BAD_SAMPLING.items() for value in values]
)
def test_sampling_parameters_are_validated_naming_the_field(param: str, value: Any) -> None:
    settings: dict[str, Any] = {"max_new_tokens": 5, param: value}
    with pytest.raises(InvalidRequestError) as refused:
        SamplingParams(**settings)
    assert refused.value.param == param
    assert f"'{param}'" in str(refused.value)


@pytest.mark.parametrize("sampling", [{"temperature": 1e-50}, {"temperature": 1e-40}, {"top_p": 0.0}])
def test_temperatures_too_small_for_the_device_and_top_p_zero_are_greedy(
    start_service: StartService, reply: Reply, sampling: dict[str, Any]
) -> None:
    # Below ~1e-38 a float32 temperature is subnormal or 0: dividing the logits by it gave noise, not the greedy reply.
    service = start_service()
    greedy_text = text_of(reply(service, PROMPT, max_new_tokens=20))
    assert text_of(reply(service, PROMPT, max_new_tokens=20, seed=1, **{"temperature": 1.0, **sampling})) == greedy_text
    assert SamplingParams(max_new_tokens=5, **sampling).greedy


def test_top_k_beyond_the_vocabulary_is_refused_naming_top_k(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    vocabulary = json.loads((service.settings.model_path / "config.json").read_text())["vocab_size"]
    assert text_of(reply(service, PROMPT, max_new_tokens=5, temperature=1.0, top_k=vocabulary, seed=1))
    for top_k in (vocabulary + 1, 2**63):  # 2**63 overflowed the device tensor and failed the whole prefill group
        with pytest.raises(InvalidRequestError, match=f"at most {vocabulary}") as refused:
            reply(service, PROMPT, max_new_tokens=5, temperature=1.0, top_k=top_k)
        assert refused.value.param == "top_k"
    assert service.generation_stats()["running"] == 0


def test_many_tiny_messages_are_refused_before_they_are_tokenized(
    start_service: StartService, reply: Reply, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = start_service()
    context = SIZES["tiny"].context_length

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the conversation was templated and tokenized")

    monkeypatch.setattr(service_module, "encode_prompt", never)
    # Each message takes at least one token: more messages than the context has tokens cannot fit, however short.
    with pytest.raises(PromptTooLongError, match=f"{context + 1} messages"):
        reply(service, [{"role": "user", "content": ""}] * (context + 1))
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_MESSAGES} messages are accepted, got 31500"):
        reply(service, [{"role": "user", "content": ""}] * 31_500)


def test_not_ready_service_refuses_to_generate(tiny_settings: Settings) -> None:
    service = ModelService(tiny_settings)

    async def first_chunk() -> None:
        await service.stream_chat(user("hi"), greedy(3), wait=False).__anext__()

    with pytest.raises(ModelNotReadyError):
        asyncio.run(first_chunk())


# ---- sampling ----


def test_seed_makes_sampling_reproducible(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    first = text_of(reply(service, PROMPT, max_new_tokens=25, temperature=1.0, seed=7))
    again = text_of(reply(service, PROMPT, max_new_tokens=25, temperature=1.0, seed=7))
    other = text_of(reply(service, PROMPT, max_new_tokens=25, temperature=1.0, seed=8))
    greedy = text_of(reply(service, PROMPT, max_new_tokens=25))
    assert first == again
    assert first != other
    assert first != greedy


def test_top_k_one_is_greedy(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    sampled = text_of(reply(service, PROMPT, max_new_tokens=20, temperature=1.5, top_k=1, seed=3))
    assert sampled == text_of(reply(service, PROMPT, max_new_tokens=20))


def test_each_request_samples_with_its_own_settings_in_a_shared_batch(
    start_service: StartService, reply: Reply
) -> None:
    service = start_service(max_batch_size=4)
    settings: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 11},
        {"temperature": 0.0},
    ]
    alone = [
        text_of(reply(service, prompt, max_new_tokens=24, **sampling))
        for prompt, sampling in zip(PROMPTS, settings, strict=True)
    ]

    async def together() -> list[str]:
        replies = [
            _collect(service, user(prompt), SamplingParams(max_new_tokens=24, **sampling), wait=True)
            for prompt, sampling in zip(PROMPTS, settings, strict=True)
        ]
        return [text_of(chunks) for chunks in await asyncio.gather(*replies)]

    assert asyncio.run(together()) == alone
    assert service.generation_stats()["largest_batch"] == len(PROMPTS)


# ---- stopping ----


def test_stop_string_ends_the_reply_and_is_never_emitted(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    chunks = reply(service, PROMPT, max_new_tokens=30)
    full = text_of(chunks)
    # A stop string that spans two chunks (so two tokens): it only appears once both are generated.
    index = next(i for i in range(2, len(chunks) - 1) if len(chunks[i].text) >= 2 and len(chunks[i + 1].text) >= 2)
    stop = chunks[index].text[-2:] + chunks[index + 1].text[:2]
    expected = full[: full.index(stop)]
    stop_end = len(expected) + len(stop)
    emitted = 0
    for chunk in chunks:  # the stop string is complete with the token of the chunk that reaches its end
        emitted += len(chunk.text)
        if emitted >= stop_end:
            tokens_until_stop = chunk.completion_tokens
            break

    stopped = reply(service, PROMPT, max_new_tokens=30, stop=("never-generated", stop))
    assert text_of(stopped) == expected
    assert stopped[-1].finish_reason == "stop"
    assert stopped[-1].completion_tokens == tokens_until_stop
    assert all(stop not in chunk.text for chunk in stopped)


def test_end_of_reply_token_finishes_with_stop(model_folders: ModelFolders, tmp_path: Path, reply: Reply) -> None:
    # Make the base model's 3rd greedy token its end-of-reply token (as <|end|> is for Phi-3).
    model_path = Path(shutil.copytree(model_folders.model_path, tmp_path / "Phi-3-mini-4k-instruct"))
    settings = Settings(
        model_path=model_path, adapters=(AdapterOption(None, model_folders.adapter_path),), base_only=True
    )
    loaded = load_model(settings)
    inputs: Any = loaded.tokenizer.apply_chat_template(
        user(PROMPT), add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    generated = loaded.model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    end_token = int(generated[2])
    first_end = generated.tolist().index(end_token)
    config_file = model_path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": [end_token]}))

    service = ModelService(settings)
    service.start_loading()
    assert service.wait_until_loaded(60) == "ready"
    try:
        chunks = reply(service, PROMPT, max_new_tokens=10)
    finally:
        service.close()
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == first_end
    assert text_of(chunks) == loaded.tokenizer.decode(generated[:first_end], skip_special_tokens=True)


# ---- limits ----


def test_max_new_tokens_is_capped_by_the_setting(start_service: StartService, reply: Reply) -> None:
    service = start_service(max_new_tokens_cap=7)
    chunks = reply(service, PROMPT, max_new_tokens=100)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 7)


def test_max_new_tokens_is_capped_by_the_context_left(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    context = SIZES["tiny"].context_length
    prompt = "one two three " * 200
    while service.count_prompt_tokens(user(prompt)) > context - 5:
        prompt = prompt[:-20]
    room = context - service.count_prompt_tokens(user(prompt))
    chunks = reply(service, prompt, max_new_tokens=100)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", room)


def test_shorter_sequences_cap_replies_and_refuse_longer_prompts(start_service: StartService, reply: Reply) -> None:
    service = start_service(max_sequence_tokens=64)
    room = 64 - service.count_prompt_tokens(user(PROMPT))
    chunks = reply(service, PROMPT, max_new_tokens=100)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", room)
    with pytest.raises(PromptTooLongError, match=r"this server's sequences hold 64 \(--max-sequence-tokens\)"):
        reply(service, "one two three " * 30)


def test_prompt_longer_than_the_context_is_refused(start_service: StartService, reply: Reply) -> None:
    service = start_service()
    with pytest.raises(PromptTooLongError, match="context holds 512"):
        reply(service, "one two three " * 300)


# ---- concurrency ----


async def _first_chunk_then_hold(service: ModelService, started: asyncio.Event, release: asyncio.Event) -> None:
    stream = service.stream_chat(user(PROMPT), greedy(400), wait=False)
    await stream.__anext__()
    started.set()
    await release.wait()
    await stream.aclose()


def test_capacity_error_when_all_slots_are_busy(start_service: StartService) -> None:
    service = start_service(max_concurrent_generations=1)

    async def scenario() -> list[GenerationChunk]:
        started, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_first_chunk_then_hold(service, started, release))
        await started.wait()
        with pytest.raises(CapacityExceededError):
            await service.stream_chat(user("hi"), greedy(3), wait=False).__anext__()
        # wait=True queues until the slot is free.
        waiting = asyncio.create_task(_collect(service, user("hi"), greedy(3), wait=True))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        release.set()
        await holder
        return await asyncio.wait_for(waiting, 30)

    chunks = asyncio.run(scenario())
    assert chunks[-1].completion_tokens == 3


def test_concurrent_generations_default_to_the_kv_cache_rows(start_service: StartService) -> None:
    service = start_service(max_batch_size=2)  # max_concurrent_generations unset

    async def scenario() -> None:
        started, release = [asyncio.Event(), asyncio.Event()], asyncio.Event()
        holders = [asyncio.create_task(_first_chunk_then_hold(service, event, release)) for event in started]
        await asyncio.gather(*(event.wait() for event in started))
        with pytest.raises(CapacityExceededError, match="all 2 generation slots are busy"):
            await service.stream_chat(user("hi"), greedy(3), wait=False).__anext__()
        release.set()
        await asyncio.gather(*holders)

    asyncio.run(scenario())


async def _collect(
    service: ModelService, messages: list[dict[str, str]], params: SamplingParams, *, wait: bool
) -> list[GenerationChunk]:
    return [chunk async for chunk in service.stream_chat(messages, params, wait=wait)]


def test_closing_the_stream_stops_generation_and_frees_the_slot(start_service: StartService) -> None:
    service = start_service(max_concurrent_generations=1)

    async def scenario() -> list[GenerationChunk]:
        stream = service.stream_chat(user(PROMPT), greedy(400), wait=False)
        await stream.__anext__()
        await stream.aclose()
        # The slot is free at once; the engine drops the row at its next step.
        return await _collect(service, user("hi"), greedy(2), wait=False)

    assert asyncio.run(scenario())[-1].completion_tokens == 2
    wait_for(lambda: service.generation_stats()["running"] == 0, 10, "the generation to stop")
    assert service.generation_stats()["decode_steps"] < 400


def test_cancelled_task_frees_the_slot(start_service: StartService) -> None:
    service = start_service(max_concurrent_generations=1)

    async def consume(started: asyncio.Event) -> None:
        params = greedy(400)
        async for _ in service.stream_chat(user(PROMPT), params, wait=True):
            started.set()

    async def scenario() -> list[GenerationChunk]:
        started = asyncio.Event()
        consumer = asyncio.create_task(consume(started))
        await started.wait()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        return await _collect(service, user("hi"), greedy(2), wait=False)

    assert asyncio.run(scenario())[-1].completion_tokens == 2
    wait_for(lambda: service.generation_stats()["running"] == 0, 10, "the generation to stop")


# ---- batching ----


def _greedy_alone(service: ModelService, reply: Reply) -> list[str]:
    return [text_of(reply(service, prompt, max_new_tokens=24)) for prompt in PROMPTS]


async def _concurrently(service: ModelService, stagger: float = 0.0) -> list[str]:
    async def one(position: int, prompt: str) -> str:
        await asyncio.sleep(stagger * position)
        chunks = await _collect(service, user(prompt), greedy(24), wait=True)
        return text_of(chunks)

    return list(await asyncio.gather(*(one(position, prompt) for position, prompt in enumerate(PROMPTS))))


def test_greedy_reply_is_the_same_alone_and_batched(start_service: StartService, reply: Reply) -> None:
    service = start_service(max_batch_size=4)
    alone = _greedy_alone(service, reply)
    assert service.generation_stats()["largest_batch"] == 1
    assert asyncio.run(_concurrently(service)) == alone
    assert service.generation_stats()["largest_batch"] == len(PROMPTS)


@pytest.mark.usefixtures("paced_decoding")  # replies last long enough that the staggered requests overlap
def test_requests_joining_a_running_batch_get_the_same_reply(start_service: StartService, reply: Reply) -> None:
    service = start_service(max_batch_size=4)
    alone = _greedy_alone(service, reply)
    # Later requests join while earlier ones are mid-reply (into free slots; rows leave as their replies end).
    assert asyncio.run(_concurrently(service, stagger=0.02)) == alone
    assert service.generation_stats()["largest_batch"] >= 2


def test_batch_caps_keep_requests_waiting(start_service: StartService, reply: Reply) -> None:
    by_size = start_service(max_batch_size=2)
    alone = _greedy_alone(by_size, reply)
    assert asyncio.run(_concurrently(by_size)) == alone
    assert by_size.generation_stats()["largest_batch"] == 2
    # Each request reserves prompt + max new tokens; with a cap below the two smallest together, one runs at a time.
    budgets = sorted(by_size.count_prompt_tokens(user(prompt)) + 24 for prompt in PROMPTS)
    by_tokens = start_service(max_batch_tokens=budgets[0] + budgets[1] - 1)
    assert asyncio.run(_concurrently(by_tokens)) == alone
    assert by_tokens.generation_stats()["largest_batch"] == 1
