"""Batched sampling on the device: per-row settings, and seeded noise independent of the batch."""

from __future__ import annotations

from typing import Any

import torch

from inference_app.engine.sampler import BatchSampler, uniform_noise
from inference_app.engine.types import SamplingParams


def test_noise_is_uniform_and_a_function_of_seed_position_and_token() -> None:
    tokens = torch.arange(20000)
    noise = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), tokens)
    assert bool(((noise > 0) & (noise < 1)).all())
    assert abs(float(noise.mean()) - 0.5) < 0.01 and abs(float(noise.var()) - 1 / 12) < 0.005
    assert torch.equal(noise[0], uniform_noise(torch.tensor([7]), torch.tensor([3]), tokens)[0])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])


def _sampler(rows: list[dict[str, Any]], vocab: int) -> BatchSampler:
    sampler = BatchSampler(len(rows), vocab, torch.device("cpu"))
    sampler.set_rows(
        list(range(len(rows))),
        [
            SamplingParams(max_new_tokens=1, **{name: value for name, value in row.items() if name != "seed"})
            for row in rows
        ],
        [row.get("seed", 0) for row in rows],
        [None] * len(rows),
    )
    return sampler


def test_each_row_samples_with_its_own_settings() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log()
    rows: list[dict[str, Any]] = [
        {"temperature": 0.0},  # greedy
        {"top_k": 1},
        {"top_p": 0.4},  # only the most likely token holds 0.4
        {"top_k": 2},
        {},  # plain sampling
    ]
    sampler = _sampler(rows, vocab=4)
    draws = 4000  # per row: one batch holds every row at positions 0..draws-1
    slots = torch.arange(len(rows)).repeat_interleave(draws)
    positions = torch.arange(draws).repeat(len(rows))
    tokens = sampler.sample(logits.expand(len(slots), 4), slots, positions, True).tokens.view(len(rows), draws)
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in tokens]) / draws
    assert frequencies[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[3, 2:].tolist() == [0.0, 0.0]
    assert abs(float(frequencies[3, 0]) - 0.5 / 0.8) < 0.03
    assert torch.allclose(frequencies[4], probabilities, atol=0.03)


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeded = {"seed": 1234, "temperature": 1.2}
    alone = _sampler([seeded], 50)
    crowded = _sampler([{"temperature": 0.0}, {"seed": 9}, {"seed": 5, "top_k": 3}, seeded], 50)
    for position in range(30):
        positions = torch.full((4,), position)
        first = alone.sample(logits[3:4], torch.tensor([0]), positions[:1], True).tokens
        among_others = crowded.sample(logits[:4], torch.arange(4), positions, True).tokens
        assert int(first[0]) == int(among_others[3])
