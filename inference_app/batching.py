"""The batching engine: one thread runs every generation, sharing each decode step among the requests in flight.

Each new request is prefilled on its own (no padding), then joins the running batch at a step boundary; one
decode step then produces the next token of every request at once. The batch's KV caches are left-padded to a
common length, and padding no row needs any more is trimmed when rows leave. Each request keeps its own sampling
settings, seed, stop strings and token budget, and streams its text back through a callback.

The transformers continuous-batching API (`generate_batch` / `init_continuous_batching`) was not used: it samples
with one do_sample and seed setting for the whole batch and has no stop strings.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn import functional
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import Cache, DynamicLayer

from inference_app.generation import GenerationChunk, SamplingParams
from inference_app.model_loading import LoadedModel

logger = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 600
# Room a KV buffer gains each time it is full: one copy of the cache per this many decode steps.
KV_GROWTH_TOKENS = 128


class IncrementalDetokenizer:
    """Turns tokens into text one at a time, decoding only a short window (never the whole reply).

    The window starts one token before the new ones, so tokenizers that drop a leading space at the start of
    a decode still produce the right text; text ending in an incomplete UTF-8 sequence waits for more tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) < len(emitted):
            return ""  # an incomplete character: wait for the tokens that complete it
        # Move the window on even when the token has no text (a skipped special token), so it stays short.
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is left (possibly an incomplete character) at the end of the reply."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        found = [buffer.find(stop) for stop in self._stops if stop in buffer]
        if found:
            self._held = ""
            return buffer[: min(found)], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, buffer: str) -> int:
        longest = min(len(buffer), max(len(stop) for stop in self._stops) - 1)
        for length in range(longest, 0, -1):
            if any(stop.startswith(buffer[-length:]) for stop in self._stops):
                return length
        return 0


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    deliver: Callable[[GenerationChunk | BaseException], None]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopMatcher
    sampler: Any  # a transformers LogitsProcessorList, or None for greedy
    generator: Any  # torch.Generator when seeded, else None (the engine thread's global RNG)
    completion_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def tokens_in_flight(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens

    def chunk(self, text: str, finish_reason: Literal["stop", "length"] | None) -> GenerationChunk:
        return GenerationChunk(text, finish_reason, len(self.prompt_ids), self.completion_tokens)


class BatchingEngine:
    """Runs all generations on one thread, sharing each decode step among the requests in the batch."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_batch_tokens: int) -> None:
        self._model = loaded.model
        self._device = torch.device(loaded.device)
        # The engine decodes on its own thread: a private copy avoids sharing the Rust tokenizer across threads.
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self._eos_ids = _eos_token_ids(loaded)
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._waiting: deque[_Request] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        # The running batch: one row per request.
        self._rows: list[_Request] = []
        self._cache: Any = None  # transformers DynamicCache, left-padded to a common length
        self._attention_mask: Any = None  # [rows, cache length]: 1 for real tokens, 0 for padding
        self._positions: Any = None  # [rows]: position id of each row's next input token
        self._next_tokens: Any = None  # [rows]: each row's last sampled token, the next step's input
        self._largest_batch = 0
        self._decode_steps = 0

    def stats(self) -> dict[str, int]:
        with self._wakeup:
            waiting = len(self._waiting)
        return {
            "running": len(self._rows),
            "waiting": waiting,
            "largest_batch": self._largest_batch,
            "decode_steps": self._decode_steps,
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def warm_up(self, prompt_ids: list[int]) -> None:
        """One short greedy generation, so the first user doesn't pay for lazy initialisation; raises its error."""
        outcome: list[GenerationChunk | BaseException] = []
        done = threading.Event()

        def deliver(item: GenerationChunk | BaseException) -> None:
            if isinstance(item, BaseException) or item.finish_reason is not None:
                outcome.append(item)
                done.set()

        request = self.submit(prompt_ids, SamplingParams(max_new_tokens=4, temperature=0), 4, deliver)
        if not done.wait(timeout=WARM_UP_TIMEOUT_S):
            request.cancel()
            raise TimeoutError(f"the warm-up generation took more than {WARM_UP_TIMEOUT_S} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        deliver: Callable[[GenerationChunk | BaseException], None],
    ) -> _Request:
        request = _Request(
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=max_new_tokens,
            deliver=deliver,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_matcher=StopMatcher(params.stop),
            sampler=self._sampler(params),
            generator=self._generator(params.seed),
        )
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def _sampler(self, params: SamplingParams) -> Any:
        if params.temperature == 0:
            return None
        warpers: list[Any] = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k is not None:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            warpers.append(TopPLogitsWarper(params.top_p))
        return LogitsProcessorList(warpers)

    def _generator(self, seed: int | None) -> Any:
        if seed is None:
            return None
        return torch.Generator(device=self._device).manual_seed(seed)

    # ---- engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                new_requests = self._take_new_requests()
                if new_requests is None:
                    return
                for request in new_requests:
                    self._run_safely(self._prefill, [request], request)
                if self._rows:  # rows just prefilled take part too: they already have their first token
                    self._run_safely(self._decode_step, list(self._rows))

    def _run_safely(self, work: Callable[..., None], requests: list[_Request], *args: Any) -> None:
        """Runs one prefill or decode step; if it fails (e.g. out of memory) its requests get the error and leave
        the batch, and the engine keeps serving."""
        try:
            work(*args)
        except Exception as error:
            logger.exception("generation failed")
            for request in requests:
                request.deliver(error)
            self._drop_rows({request for request in requests if request in self._rows})

    def _take_new_requests(self) -> list[_Request] | None:
        """Requests that join the batch at this step boundary (waits while there is nothing to do); None: stop."""
        with self._wakeup:
            while not self._stopping and not self._rows and not self._waiting:
                self._wakeup.wait()
            if self._stopping:
                return None
            in_flight = sum(request.tokens_in_flight for request in self._rows)
            joining: list[_Request] = []
            while self._waiting and len(self._rows) + len(joining) < self._max_batch_size:
                request = self._waiting[0]
                if request.cancelled.is_set():
                    self._waiting.popleft()
                    continue
                batch_is_empty = not self._rows and not joining
                if in_flight + request.tokens_in_flight > self._max_batch_tokens and not batch_is_empty:
                    break
                joining.append(self._waiting.popleft())
                in_flight += request.tokens_in_flight
            return joining

    def _prefill(self, request: _Request) -> None:
        """Runs the prompt alone (no padding), samples the first token and adds the request to the batch."""
        cache = Cache(layer_class_to_replicate=GrowingKVLayer)
        input_ids = torch.tensor([request.prompt_ids], device=self._device)
        logits = self._model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = self._sample(request, logits[0, -1])
        if self._accept(request, token):
            return
        self._add_row(request, cache, token)

    def _add_row(self, request: _Request, cache: Any, token: int) -> None:
        length = len(request.prompt_ids)
        mask = torch.ones((1, length), dtype=torch.long, device=self._device)
        position = torch.tensor([length], device=self._device)
        next_token = torch.tensor([token], device=self._device)
        if not self._rows:
            self._cache, self._attention_mask = cache, mask
            self._positions, self._next_tokens = position, next_token
        else:
            common = max(length, self._attention_mask.shape[1])
            # Build everything first and assign after, so a failure (out of memory) leaves the batch as it was.
            merged = [
                (
                    torch.cat([_pad_left(batch_layer.keys, common), _pad_left(row_layer.keys, common)]),
                    torch.cat([_pad_left(batch_layer.values, common), _pad_left(row_layer.values, common)]),
                )
                for batch_layer, row_layer in zip(self._cache.layers, cache.layers, strict=True)
            ]
            attention_mask = torch.cat([_pad_left(self._attention_mask, common), _pad_left(mask, common)])
            for layer, (keys, values) in zip(self._cache.layers, merged, strict=True):
                layer.keys, layer.values = keys, values
            self._attention_mask = attention_mask
            self._positions = torch.cat([self._positions, position])
            self._next_tokens = torch.cat([self._next_tokens, next_token])
        self._rows.append(request)

    def _decode_step(self) -> None:
        cancelled = {request for request in self._rows if request.cancelled.is_set()}
        if cancelled:
            self._drop_rows(cancelled)
            if not self._rows:
                return
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=self._device)
        self._attention_mask = torch.cat([self._attention_mask, ones], dim=1)
        logits = self._model(
            input_ids=self._next_tokens[:, None],
            attention_mask=self._attention_mask,
            position_ids=self._positions[:, None],
            past_key_values=self._cache,
            use_cache=True,
        ).logits[:, -1]
        self._positions += 1
        self._decode_steps += 1
        self._largest_batch = max(self._largest_batch, len(self._rows))
        greedy_tokens = logits.argmax(dim=-1).tolist()  # one device sync for the whole batch
        tokens = [
            greedy_token if request.sampler is None else self._sample(request, row_logits)
            for request, row_logits, greedy_token in zip(self._rows, logits, greedy_tokens, strict=True)
        ]
        self._next_tokens = torch.tensor(tokens, device=self._device)
        finished = {request for request, token in zip(self._rows, tokens, strict=True) if self._accept(request, token)}
        if finished:
            self._drop_rows(finished)

    def _sample(self, request: _Request, logits: Any) -> int:
        if request.sampler is None:
            return int(logits.argmax())
        scores = request.sampler(None, logits.float()[None])
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=request.generator))

    def _accept(self, request: _Request, token: int) -> bool:
        """Streams the token's text to the request's caller; True when the request is finished."""
        if request.cancelled.is_set():
            return True
        if token in self._eos_ids:
            self._finish(request, request.stop_matcher.flush() + request.detokenizer.flush(), "stop")
            return True
        request.completion_tokens += 1
        text, stopped = request.stop_matcher.push(request.detokenizer.push(token))
        if stopped:
            self._finish(request, text, "stop")
            return True
        if request.completion_tokens >= request.max_new_tokens:
            tail, _ = request.stop_matcher.push(request.detokenizer.flush())
            self._finish(request, text + tail + request.stop_matcher.flush(), "length")
            return True
        if text:
            request.deliver(request.chunk(text, None))
        return False

    def _finish(self, request: _Request, text: str, finish_reason: Literal["stop", "length"]) -> None:
        request.deliver(request.chunk(text, finish_reason))

    def _drop_rows(self, requests: set[_Request]) -> None:
        """Removes finished or cancelled rows and the padding columns no remaining row needs."""
        keep = [index for index, request in enumerate(self._rows) if request not in requests]
        self._rows = [self._rows[index] for index in keep]
        if not self._rows:
            self._cache = self._attention_mask = self._positions = self._next_tokens = None
            return
        index = torch.tensor(keep, device=self._device)
        self._attention_mask = self._attention_mask[index]
        first_used = int(self._attention_mask.any(dim=0).nonzero()[0])
        self._attention_mask = self._attention_mask[:, first_used:]
        for layer in self._cache.layers:
            # Both slices before either assignment: assigning `keys` changes the filled length `values` reads.
            keys, values = layer.keys[index, :, first_used:], layer.values[index, :, first_used:]
            layer.keys, layer.values = keys, values
        self._positions = self._positions[index]
        self._next_tokens = self._next_tokens[index]


class GrowingKVLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into spare room in its buffers.

    transformers' DynamicLayer concatenates on every step, copying the whole cache each time; here the buffers
    grow by KV_GROWTH_TOKENS when full, so a decode step copies one position. `keys` and `values` are the filled
    part; assigning them (as the engine does when rows join or leave the batch) replaces the buffers.
    """

    def __init__(self) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buffer is None else self._key_buffer[:, :, : self._length]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_buffer = tensor
        self._length = 0 if tensor is None or tensor.dim() < 3 else tensor.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[:, :, : self._length]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buffer = tensor

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self._key_buffer is None or self._key_buffer.dim() < 3:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        assert self._value_buffer is not None
        start, end = self._length, self._length + key_states.shape[2]
        if end > self._key_buffer.shape[2]:
            self._key_buffer = _grow(self._key_buffer, start, end + KV_GROWTH_TOKENS)
            self._value_buffer = _grow(self._value_buffer, start, end + KV_GROWTH_TOKENS)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._length = end
        return self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]


def _grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    shape = (*buffer.shape[:2], capacity, *buffer.shape[3:])
    grown = buffer.new_zeros(shape)
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


def _pad_left(tensor: Any, length: int) -> Any:
    """Zero-pads dimension 2 (sequence) of a [batch, heads, seq, dim] cache, or dimension 1 of a [batch, seq] mask."""
    missing = length - (tensor.shape[2] if tensor.dim() == 4 else tensor.shape[1])
    if missing == 0:
        return tensor
    padding = (0, 0, missing, 0) if tensor.dim() == 4 else (missing, 0)
    return functional.pad(tensor, padding)


def _eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """End-of-reply tokens: the generation config's (Phi-3 lists <|end|>, <|assistant|>, <|endoftext|>) and the
    tokenizer's."""
    ids: list[int] = []
    generation_config = getattr(loaded.model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(loaded.tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))
