"""Choosing every row's next token on the device in one go: greedy rows take the argmax; sampled rows their own
temperature, top-k and top-p, and noise from their own seed.

The noise is a hash of (seed, position, token id), not a torch.Generator per row: rows with different seeds share
one set of kernels, and a seeded reply is the same whichever rows it shares the batch with. The draw is the
exponential race (argmax of p / E with E ~ Exp(1)), which picks each token with probability p.
"""

from __future__ import annotations

import torch

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


class BatchSampler:
    """Per-slot sampling settings as device tensors, and the batched draw."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.full((slots,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self._ranks = torch.arange(vocab_size, device=device)
        self._vocab_size = vocab_size

    def set_rows(
        self,
        slots: list[int],
        temperatures: list[float],
        top_ks: list[int | None],
        top_ps: list[float],
        seeds: list[int],
    ) -> None:
        """The settings of requests joining in `slots` (one host-to-device copy per setting)."""
        device = self.temperature.device
        index = torch.tensor(slots, device=device)
        self.greedy[index] = torch.tensor([temperature == 0 for temperature in temperatures], device=device)
        self.temperature[index] = torch.tensor([temperature or 1.0 for temperature in temperatures], device=device)
        self.top_k[index] = torch.tensor([top_k or self._vocab_size for top_k in top_ks], device=device)
        self.top_p[index] = torch.tensor(top_ps, device=device)
        self.seed[index] = torch.tensor(seeds, device=device)

    def sample(
        self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, any_sampled: bool
    ) -> torch.Tensor:
        """Next tokens [rows] for `logits` [rows, vocab] of the rows in `slots` at `positions`; `any_sampled`
        False (every row greedy) skips the sampling kernels."""
        greedy_tokens = logits.argmax(dim=-1)
        if not any_sampled:
            return greedy_tokens
        scores = logits.float() / self.temperature[slots, None]
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
