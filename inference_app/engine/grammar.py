"""Grammar-constrained decoding with llguidance (what structured outputs and tool calls run on).

A request with a grammar (an llguidance grammar string: JSON schemas and Lark, made by the API layer) gets its own
matcher, a copy of the grammar's compiled prototype (compiled once per grammar and cached, so a schema's second
request skips the compile). At each step the sampler asks every constrained row's matcher which tokens may come next
(a bitmask, computed on the CPU in parallel while the device runs the forward pass) and masks the other tokens'
logits; rows without a grammar share the batch unmasked. The engine then feeds each sampled token to its matcher;
when the grammar allows nothing more the reply ends.

llguidance was chosen over xgrammar: it needs no torch or triton of its own (a 3 MB wheel), computes masks lazily
(no per-schema precompilation over the vocabulary, so a new schema costs a millisecond, not seconds), and names the
JSON-schema feature it cannot enforce, which the API turns into a 400.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

logger = logging.getLogger(__name__)

# Compiled grammars kept (least recently used dropped first): a handful of schemas serve most traffic.
CACHED_GRAMMARS = 128


class GrammarError(ValueError):
    """A grammar llguidance cannot build (the message names the reason)."""


class GrammarMatcher:
    """One request's position in its grammar (engine thread)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advances past the sampled token; False when the grammar allows nothing more (the reply is complete)."""
        if not self.matcher.consume_token(token):
            # Cannot happen for a token the mask allowed; end the reply rather than generate unconstrained text.
            logger.error("the grammar refused a token it allowed: %s", self.matcher.get_error())
            return False
        return not self.matcher.is_stopped()


class Grammars:
    """Compiles grammars for one tokenizer and keeps the compiled ones (thread-safe: requests compile on their
    callers' threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first grammar (about 1 s for Phi-3's)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> GrammarMatcher:
        """A fresh matcher for `grammar`; raises GrammarError when it cannot be built."""
        with self._lock:
            prototype = self._compiled.get(grammar)
            if prototype is not None:
                self._compiled.move_to_end(grammar)
            else:
                prototype = self._compile(grammar)
                self._compiled[grammar] = prototype
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            return GrammarMatcher(prototype.deep_copy())

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids
            )
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


class TokenMasks:
    """The allowed tokens of a batch's rows as a boolean [rows, vocab] tensor on the device, from their matchers'
    bitmasks (a pinned host buffer on CUDA, copied without waiting)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self._vocab_size = vocab_size
        self._device = device
        self._host = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32, device=device)
        self._executor: llguidance.LLExecutor | None = None

    def allowed(self, grammars: list[GrammarMatcher | None]) -> torch.Tensor:
        """[rows, vocab]: True where the row's grammar allows the token (every token for rows without one)."""
        host = self._host_rows(len(grammars))
        host.fill_(-1)
        constrained = [(grammar.matcher, row) for row, grammar in enumerate(grammars) if grammar is not None]
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        llguidance.torch.fill_next_token_bitmask_par(self._executor, constrained, host)
        words = host.to(self._device, non_blocking=True)
        bits = (words[:, :, None] >> self._bits) & 1
        return bits.view(len(grammars), -1)[:, : self._vocab_size].bool()

    def _host_rows(self, rows: int) -> torch.Tensor:
        if self._host.shape[0] < rows:
            pinned = self._device.type == "cuda"
            self._host = torch.empty(rows, self._host.shape[1], dtype=torch.int32, pin_memory=pinned)
        return self._host[:rows]
