"""Constrained decoding and the per-row sampling extras on the engine: grammars (structured outputs), logit bias,
presence and frequency penalties, log probabilities; each row its own, in a batch shared with rows without them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from llguidance import LLMatcher

from inference_app.api.structured_outputs import json_schema_grammar
from inference_app.engine.grammar import Grammars, TokenMasks
from inference_app.engine.sampler import BatchSampler
from inference_app.service import GenerationChunk, ModelService, SamplingParams
from tests.model_factory import build_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Tell me about a person."}]


def assert_is_person(text: str) -> None:
    person = json.loads(text)
    assert list(person) == ["name", "age", "pet"]
    assert isinstance(person["name"], str) and len(person["name"]) <= 8
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert person["pet"] in ("cat", "dog")


def replies_at_once(service: ModelService, params: list[SamplingParams]) -> list[list[GenerationChunk]]:
    """The replies to USER with each of `params`, submitted together (so they share the batch)."""

    async def one(row: SamplingParams) -> list[GenerationChunk]:
        return [chunk async for chunk in service.stream_chat(USER, row, wait=True)]

    async def run() -> list[list[GenerationChunk]]:
        return list(await asyncio.gather(*(one(row) for row in params)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def loaded_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


@pytest.mark.usefixtures("paced_decoding")
def test_constrained_and_free_rows_share_a_batch_each_with_its_own_mask(
    start_service: Callable[..., ModelService],
) -> None:
    service = start_service()
    grammar = json_schema_grammar(PERSON, "response_format")
    free_greedy = SamplingParams(max_new_tokens=40, temperature=0)
    rows = [
        SamplingParams(max_new_tokens=60, temperature=0, grammar=grammar),
        free_greedy,
        SamplingParams(max_new_tokens=60, temperature=1.0, seed=3, grammar=grammar),
        SamplingParams(max_new_tokens=40, temperature=1.0, seed=4),
    ]
    alone = text(replies_at_once(service, [free_greedy])[0])
    replies = replies_at_once(service, rows)
    assert service.generation_stats()["largest_batch"] == len(rows)
    for constrained in (replies[0], replies[2]):
        assert_is_person(text(constrained))
        assert constrained[-1].finish_reason == "stop"  # the grammar ended the reply
    assert text(replies[1]) == alone, "a free row's reply is not touched by its neighbours' masks"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text(replies[3]))  # the random model writes no JSON unconstrained


@pytest.mark.gpu
def test_on_the_gpu_constrained_rows_decode_with_cuda_graphs(start_service: Callable[..., ModelService]) -> None:
    service = start_service(cuda_graphs=True)
    assert service.info()["device"] == "cuda"
    assert service._engine is not None and "graph" in service._engine.describe()["decode"].lower()
    grammar = json_schema_grammar(PERSON, "response_format")
    rows = [SamplingParams(max_new_tokens=60, temperature=0.7, seed=seed, grammar=grammar) for seed in range(6)]
    rows.append(SamplingParams(max_new_tokens=30, temperature=0))
    for reply in replies_at_once(service, rows)[:-1]:
        assert_is_person(text(reply))


def test_token_masks_allow_only_what_each_rows_grammar_allows(loaded_tokenizer: Any) -> None:
    vocab = len(loaded_tokenizer)
    grammars = Grammars(loaded_tokenizer, vocab, frozenset([loaded_tokenizer.eos_token_id]))
    digits = grammars.matcher(LLMatcher.grammar_from_regex(r"[0-9]+"))
    allowed = TokenMasks(vocab, torch.device("cpu")).allowed([None, digits])
    assert bool(allowed[0].all()), "a row without a grammar is not masked"
    texts = [loaded_tokenizer.decode([token]) for token in allowed[1].nonzero()[:, 0].tolist()]
    assert texts and all(text.isdigit() for text in texts)


def test_a_cached_grammar_gives_each_request_a_fresh_matcher(loaded_tokenizer: Any) -> None:
    vocab = len(loaded_tokenizer)
    grammars = Grammars(loaded_tokenizer, vocab, frozenset([loaded_tokenizer.eos_token_id]))
    grammar = LLMatcher.grammar_from_regex(r"ab")
    first, second = grammars.matcher(grammar), grammars.matcher(grammar)
    first.accept(loaded_tokenizer.encode("a")[0])
    masks = TokenMasks(vocab, torch.device("cpu"))
    assert not torch.equal(masks.allowed([first]), masks.allowed([second]))


def _sampler(vocab: int, *rows: SamplingParams) -> BatchSampler:
    sampler = BatchSampler(len(rows), vocab, torch.device("cpu"))
    sampler.set_rows(list(range(len(rows))), list(rows), [0] * len(rows), [None] * len(rows))
    return sampler


def test_logit_bias_bans_and_forces_tokens_per_row() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]]).expand(3, 4)
    sampler = _sampler(
        4,
        SamplingParams(max_new_tokens=1, temperature=0, logit_bias=((0, -100.0),)),
        SamplingParams(max_new_tokens=1, temperature=0, logit_bias=((3, 100.0),)),
        SamplingParams(max_new_tokens=1, temperature=0),
    )
    tokens = sampler.sample(logits, torch.arange(3), torch.zeros(3, dtype=torch.long), False, [0, 1, 2]).tokens
    assert tokens.tolist() == [1, 3, 0]


def test_frequency_and_presence_penalties_count_each_rows_own_tokens() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]]).expand(3, 3)
    sampler = _sampler(
        3,
        SamplingParams(max_new_tokens=4, temperature=0, frequency_penalty=2.0),
        SamplingParams(max_new_tokens=4, temperature=0, presence_penalty=1.0),
        SamplingParams(max_new_tokens=4, temperature=0),
    )
    steps = []
    for position in range(3):
        positions = torch.full((3,), position)
        steps.append(sampler.sample(logits, torch.arange(3), positions, False, [0, 1, 2]).tokens.tolist())
    # Row 0: 3.0, then 3.0 - 2 < 2.5, then 2.5 - 2 < 3.0 - 2. Row 1: once each token is in, both lose 1.
    assert [step[0] for step in steps] == [0, 1, 0]
    assert [step[1] for step in steps] == [0, 1, 0]
    assert [step[2] for step in steps] == [0, 0, 0]


def test_log_probabilities_are_those_of_the_sampled_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).expand(2, 4)
    sampler = _sampler(
        4,
        SamplingParams(max_new_tokens=1, temperature=0.5, top_logprobs=2),
        SamplingParams(max_new_tokens=1, temperature=0),  # asks for none
    )
    sampled = sampler.sample(logits, torch.arange(2), torch.zeros(2, dtype=torch.long), True, [0, 1])
    assert sampled.logprobs is not None and sampled.logprobs[1] is None
    row = sampled.logprobs[0]
    assert row is not None
    expected = torch.log_softmax(logits[0] / 0.5, dim=-1)
    assert row.token == int(sampled.tokens[0])
    assert row.logprob == pytest.approx(float(expected[row.token]))
    assert [token for token, _ in row.top] == [0, 1]
    assert [value for _, value in row.top] == pytest.approx(expected[:2].tolist())
