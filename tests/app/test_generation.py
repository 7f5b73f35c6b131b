"""Generation through ModelService: streaming, sampling, stop strings, limits, concurrency and batching."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from inference_app.engine.model_loading import load_model
from inference_app.service import (
    CapacityExceededError,
    GenerationChunk,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
    plain_template_prompt,
)
from inference_app.settings import AdapterOption, Settings
from tests.model_factory import SIZES, ModelFolders

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


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


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
    inputs = reference.tokenizer.apply_chat_template(
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
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
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


def test_bad_messages_are_refused(start_service: StartService) -> None:
    service = start_service()
    with pytest.raises(ValueError, match="role"):
        service.count_prompt_tokens([{"role": "tool", "content": "x"}])


def test_sampling_parameters_are_validated() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**{"max_new_tokens": 5, **bad})


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
    settings = [
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
    inputs = loaded.tokenizer.apply_chat_template(
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


def test_stop_matcher_holds_back_partial_stops() -> None:
    matcher = StopMatcher(("END", "</s>"))
    assert matcher.push("Hello E") == ("Hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("X <") == ("ENX ", False)
    assert matcher.push("/s") == ("", False)
    assert matcher.push("> after") == ("", True)
    unfinished = StopMatcher(("END",))
    assert unfinished.push("the EN") == ("the ", False)
    assert unfinished.flush() == "EN"


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


# ---- incremental detokenization ----


class _CountingTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest_decode = 0

    def decode(self, ids: list[int], **options: Any) -> str:
        self.longest_decode = max(self.longest_decode, len(ids))
        return str(self.tokenizer.decode(ids, **options))


def test_detokenizer_streams_exact_text_without_redecoding_the_reply(model_folders: ModelFolders) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_folders.model_path)
    text = "Héllo wörld, 猫 and 🐱 — " * 20  # multi-byte characters split over several byte-level tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = _CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(pieces) + detokenizer.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert len(ids) > 200
    assert counting.longest_decode <= 5
    # The tokenizer itself takes the fast path (its Rust decode directly): the same text.
    direct = IncrementalDetokenizer(tokenizer)
    assert "".join(direct.push(token) for token in ids) + direct.flush() == text


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
    wait_for(lambda: service.generation_stats()["running"] == 0)
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
    wait_for(lambda: service.generation_stats()["running"] == 0)


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
