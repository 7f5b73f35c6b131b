"""Choosing every row's next token on the device in one go: greedy rows take the argmax; sampled rows their own
temperature, top-k and top-p, and noise from their own seed. Before either, each row's logits get its own logit bias,
presence and frequency penalties, and grammar mask (structured outputs, inference_app.engine.grammar); the log
probabilities a row asked for come from the distribution it was sampled from (after those and the temperature,
before top-k and top-p cut it).

The noise is a hash of (seed, position, token id), not a torch.Generator per row: rows with different seeds share
one set of kernels, and a seeded reply is the same whichever rows it shares the batch with. The draw is the
exponential race (argmax of p / E with E ~ Exp(1)), which picks each token with probability p.

All of this runs after the model's forward pass (outside any CUDA graph), and each extra costs a step only while a
row in it uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference_app.engine.grammar import GrammarMatcher, TokenMasks
from inference_app.engine.types import SamplingParams, TokenLogprobs

_MASK_32 = 0xFFFFFFFF


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors holding 32-bit values; int64 products keep the low bits."""
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & _MASK_32
    values = values ^ (values >> 15)
    values = (values * 0x846CA68B) & _MASK_32
    return values ^ (values >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1) [rows, tokens], a function of each row's seed and position and of the token id."""
    row_keys = _mix32(_mix32(seeds & _MASK_32) ^ (seeds >> 32) ^ _mix32(positions & _MASK_32))
    bits = _mix32(row_keys[:, None] ^ _mix32(token_ids))
    return (bits.double() + 0.5) / 2**32


@dataclass
class SampledTokens:
    tokens: torch.Tensor  # [rows], on the device
    logprobs: list[TokenLogprobs | None] | None = None  # per row, for rows that asked; None: no row asked


class BatchSampler:
    """Per-slot sampling settings as device tensors (and, on the host, which slots use the extras), and the batched
    draw."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.full((slots,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self.presence_penalty = torch.zeros(slots, device=device)
        self.frequency_penalty = torch.zeros(slots, device=device)
        # Allocated at the first request that needs them: [slots, vocab] each.
        self._logit_bias: torch.Tensor | None = None
        self._token_counts: torch.Tensor | None = None  # the reply's tokens so far, for the penalties
        self._ranks = torch.arange(vocab_size, device=device)
        self._vocab_size = vocab_size
        self._device = device
        # Host side: the slots using each extra.
        self._biased: set[int] = set()
        self._penalized: set[int] = set()
        self._top_logprobs: dict[int, int] = {}
        self._grammars: dict[int, GrammarMatcher] = {}
        self._masks = TokenMasks(vocab_size, device)

    def set_rows(
        self, slots: list[int], params: list[SamplingParams], seeds: list[int], grammars: list[GrammarMatcher | None]
    ) -> None:
        """The settings of requests joining in `slots` (one host-to-device copy per setting)."""
        device = self._device
        index = torch.tensor(slots, device=device)
        self.greedy[index] = torch.tensor([row.greedy for row in params], device=device)
        self.temperature[index] = torch.tensor([float(row.temperature or 1.0) for row in params], device=device)
        self.top_k[index] = torch.tensor([row.top_k or self._vocab_size for row in params], device=device)
        self.top_p[index] = torch.tensor([float(row.top_p) for row in params], device=device)
        self.seed[index] = torch.tensor(seeds, device=device)
        self.presence_penalty[index] = torch.tensor([float(row.presence_penalty) for row in params], device=device)
        self.frequency_penalty[index] = torch.tensor([float(row.frequency_penalty) for row in params], device=device)
        self.remove_rows(slots)
        for slot, row, grammar in zip(slots, params, grammars, strict=True):
            if row.logit_bias:
                self._set_logit_bias(slot, row.logit_bias)
            if row.presence_penalty or row.frequency_penalty:
                self._penalized.add(slot)
                self._counts()[slot] = 0
            if row.top_logprobs is not None:
                self._top_logprobs[slot] = row.top_logprobs
            if grammar is not None:
                self._grammars[slot] = grammar

    def remove_rows(self, slots: list[int]) -> None:
        for slot in slots:
            self._biased.discard(slot)
            self._penalized.discard(slot)
            self._top_logprobs.pop(slot, None)
            self._grammars.pop(slot, None)

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        any_sampled: bool,
        row_slots: list[int] | None = None,
    ) -> SampledTokens:
        """Next tokens for `logits` [rows, vocab] of the rows in `slots` at `positions`; `any_sampled` False (every
        row greedy) skips the sampling kernels. `row_slots` is `slots` on the host (None: rows use no extras)."""
        scores = self._adjusted_scores(logits, slots, row_slots or [])
        greedy_tokens = scores.argmax(dim=-1)
        tokens = self._sampled_tokens(scores, slots, positions, greedy_tokens) if any_sampled else greedy_tokens
        if row_slots and self._penalized.intersection(row_slots):
            self._counts().index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        return SampledTokens(tokens, self._logprobs(scores, slots, tokens, row_slots or []))

    def _adjusted_scores(self, logits: torch.Tensor, slots: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
        """The logits (float) with each row's logit bias, penalties and grammar mask applied."""
        scores = logits.float()
        if self._biased.intersection(row_slots):
            scores = scores + self._bias()[slots]
        if self._penalized.intersection(row_slots):
            counts = self._counts()[slots].float()
            scores = scores - self.frequency_penalty[slots, None] * counts
            scores = scores - self.presence_penalty[slots, None] * (counts > 0).float()
        grammars = [self._grammars.get(slot) for slot in row_slots]
        if any(grammar is not None for grammar in grammars):
            scores = scores.masked_fill(~self._masks.allowed(grammars), float("-inf"))
        return scores

    def _sampled_tokens(
        self, scores: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, greedy_tokens: torch.Tensor
    ) -> torch.Tensor:
        scores = scores / self.temperature[slots, None]
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_scores = sorted_scores.masked_fill(self._ranks >= self.top_k[slots, None], float("-inf"))
        probabilities = torch.softmax(sorted_scores, dim=-1)
        mass_before = probabilities.cumsum(dim=-1) - probabilities
        # Top-p keeps the most likely tokens until their mass reaches top_p (the first always).
        probabilities = probabilities.masked_fill(mass_before >= self.top_p[slots, None], 0.0)
        noise = uniform_noise(self.seed[slots], positions, order)
        choice = (probabilities.double() / -torch.log(noise)).argmax(dim=-1, keepdim=True)
        sampled = order.gather(1, choice)[:, 0]
        return torch.where(self.greedy[slots], greedy_tokens, sampled)

    def _logprobs(
        self, scores: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor, row_slots: list[int]
    ) -> list[TokenLogprobs | None] | None:
        """Each asking row's sampled token and top alternatives with their log probabilities (one device-to-host
        copy)."""
        wanted = [self._top_logprobs.get(slot) for slot in row_slots]
        if all(top is None for top in wanted):
            return None
        # Greedy rows have temperature 1 here: their distribution is the adjusted logits'.
        logprobs = torch.log_softmax(scores / self.temperature[slots, None], dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        most = max(top or 0 for top in wanted)
        top_values, top_ids = logprobs.topk(max(most, 1), dim=-1)
        chosen_host, values_host, ids_host = chosen.tolist(), top_values.tolist(), top_ids.tolist()
        return [
            None
            if top is None
            # Tokens the row's grammar rules out (log probability -inf) are no alternatives.
            else TokenLogprobs(
                token,
                value,
                tuple(pair for pair in list(zip(ids, row_values, strict=True))[:top] if pair[1] > -math.inf),
            )
            for top, token, value, ids, row_values in zip(
                wanted, tokens.tolist(), chosen_host, ids_host, values_host, strict=True
            )
        ]

    def _set_logit_bias(self, slot: int, logit_bias: tuple[tuple[int, float], ...]) -> None:
        bias = self._bias()
        bias[slot] = 0
        ids = torch.tensor([token for token, _ in logit_bias], device=self._device)
        bias[slot, ids] = torch.tensor([value for _, value in logit_bias], device=self._device)
        self._biased.add(slot)

    def _bias(self) -> torch.Tensor:
        if self._logit_bias is None:
            self._logit_bias = torch.zeros(len(self.seed), self._vocab_size, device=self._device)
        return self._logit_bias

    def _counts(self) -> torch.Tensor:
        if self._token_counts is None:
            self._token_counts = torch.zeros(len(self.seed), self._vocab_size, dtype=torch.int32, device=self._device)
        return self._token_counts
