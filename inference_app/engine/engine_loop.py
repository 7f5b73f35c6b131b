"""The batching engine: one thread runs every generation, sharing each decode step among the requests in flight.

Requests wait in a queue; at each step boundary the ones that fit join: their prompts are prefilled together
(right-padded) into free slots of the KV cache (kv_cache; a paged cache also gives each its blocks, and a request
waits while too few are free), and their first tokens sampled. One decode step then produces the next token
of every request at once: each row at its own position, the whole batch sampled on the device
(sampler), one device-to-host copy of the new tokens. On a GPU the step replays a CUDA graph
(cuda_graphs). Each request keeps its own sampling settings, seed, stop strings and token budget;
its tokens become text on the text thread (detokenizer), off the step's critical path.

The transformers continuous-batching API (`generate_batch` / `init_continuous_batching`) was not used: it samples
with one do_sample and seed setting for the whole batch and has no stop strings.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inference_app.engine.cuda_graphs import SHORTEST_LENGTH_BUCKET, DecodeRunner, make_decoder
from inference_app.engine.detokenizer import (
    EngineRequest,
    IncrementalDetokenizer,
    StopMatcher,
    TextStreamer,
    TokenEvent,
)
from inference_app.engine.kv_cache import CacheShape, KVCache, SlotAllocator, cache_budget, plan_cache
from inference_app.engine.model_loading import LoadedModel, ModelLoadError
from inference_app.engine.sampler import BatchSampler
from inference_app.engine.types import GenerationChunk, SamplingParams

logger = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 600
MAX_BATCH_SIZE_OPTION = "--max-batch-size / INFERENCE_MAX_BATCH_SIZE"
MAX_SEQUENCE_TOKENS_OPTION = "--max-sequence-tokens / INFERENCE_MAX_SEQUENCE_TOKENS"
KV_CACHE_TOKENS_OPTION = "--kv-cache-tokens / INFERENCE_KV_CACHE_TOKENS"
# Prompts prefilled together hold at most this many tokens, padding included (one longer prompt runs alone).
PREFILL_TOKENS = 8192


@dataclass(frozen=True)
class EngineOptions:
    max_batch_size: int | None = None  # KV-cache slots; None: 64, fewer on a GPU too small (kv_cache.plan_cache)
    max_batch_tokens: int | None = None  # prompt + max new tokens of the requests in flight; None: no cap
    max_sequence_tokens: int | None = None  # tokens of a sequence (prompt + reply); None: the model's context
    kv_cache_tokens: int | None = None  # tokens the KV cache holds in all; None: as many as memory holds
    cuda_graphs: bool = True  # on CUDA; the CPU always runs eager


class DecodeBatch:
    """The running batch: which request holds which slot, and per slot (on the device) the next input token, its
    position and whether a request holds the slot. Rows are slots: a decode step runs over slots 0..width-1."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.requests: dict[int, EngineRequest] = {}
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self._next_positions: dict[int, int] = {}  # host copy of `positions` for the slots in use
        self._device = device

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def width(self) -> int:
        """Rows a decode step must cover: up to the highest slot in use."""
        return max(self.requests) + 1

    @property
    def length(self) -> int:
        """Key positions a decode step must attend to: up to the furthest row's new token."""
        return max(self._next_positions.values()) + 1

    @property
    def any_sampled(self) -> bool:
        return any(not request.params.greedy for request in self.requests.values())

    def add(self, slots: list[int], requests: list[EngineRequest], tokens: torch.Tensor, positions: list[int]) -> None:
        index = torch.tensor(slots, device=self._device)
        self.tokens[index] = tokens
        self.positions[index] = torch.tensor(positions, device=self._device)
        self.active[index] = True
        for slot, request, position in zip(slots, requests, positions, strict=True):
            self.requests[slot] = request
            self._next_positions[slot] = position

    def advance(self, new_tokens: torch.Tensor, width: int) -> None:
        """The rows in use take their new token as the next input, one position further (on the device)."""
        active = self.active[:width]
        self.tokens[:width] = torch.where(active, new_tokens, 0)
        self.positions[:width] += active
        for slot in self._next_positions:
            self._next_positions[slot] += 1

    def remove(self, slots: list[int]) -> None:
        """Frees the slots: their rows go on computing (when below the width) at position 0 of a free slot."""
        if not slots:
            return
        index = torch.tensor(slots, device=self._device)
        self.tokens[index] = 0
        self.positions[index] = 0
        self.active[index] = False
        for slot in slots:
            del self.requests[slot]
            del self._next_positions[slot]


class BatchingEngine:
    """Runs all generations on one thread, sharing each decode step among the requests in the batch."""

    def __init__(self, loaded: LoadedModel, options: EngineOptions) -> None:
        self._model = loaded.model
        self._device = torch.device(loaded.device)
        # The engine streams text on its own thread: a private copy avoids sharing the Rust tokenizer across threads.
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self._eos_ids = frozenset(_eos_token_ids(loaded))
        self._options = options
        # A KV-cache row holds a whole sequence (prompt + reply): by default the model's context.
        self.sequence_tokens = min(loaded.context_length, options.max_sequence_tokens or loaded.context_length)
        self._waiting: deque[EngineRequest] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._text = TextStreamer()
        self._largest_batch = 0
        self._decode_steps = 0
        # Set by start(): the KV cache and what goes with its slots.
        self._cache: KVCache
        self._slots: SlotAllocator
        self._batch: DecodeBatch
        self._sampler: BatchSampler
        self._decoder: DecodeRunner
        self._slot_index: torch.Tensor  # 0..slots-1 on the device

    @property
    def slots(self) -> int:
        """Requests that can run at once (KV-cache slots); known after start()."""
        return self._cache.plan.slots

    def describe(self) -> dict[str, Any]:
        """The KV cache and the decode mode, for logs and benchmarks."""
        cache = self._cache
        return {
            "slots": cache.plan.slots,
            "slot_tokens": cache.plan.slot_tokens,
            "kv_cache_tokens": cache.tokens,
            "paged": cache.plan.paged,
            "kv_cache_bytes": cache.bytes,
            "decode": self._decoder.description,
            "summary": f"{cache.describe()}, decode step {self._decoder.description}",
        }

    def stats(self) -> dict[str, int]:
        with self._wakeup:
            waiting = len(self._waiting)
        return {
            "running": len(self._batch),
            "waiting": waiting,
            "largest_batch": self._largest_batch,
            "free_kv_blocks": self._cache.free_blocks,
            "decode_steps": self._decode_steps,
        }

    def start(self) -> None:
        """Allocates the KV cache, captures the CUDA graphs (on CUDA) and starts the engine and text threads."""
        self._cache = self._allocate_cache()
        slot_count = self.slots
        self._slots = SlotAllocator(slot_count)
        self._batch = DecodeBatch(slot_count, self._device)
        self._sampler = BatchSampler(slot_count, int(self._model.config.vocab_size), self._device)
        self._slot_index = torch.arange(slot_count, device=self._device)
        with torch.inference_mode():
            self._decoder = self._make_decoder()
        logger.info("generation engine: %s", self.describe()["summary"])
        self._text.start()
        self._thread.start()

    def _allocate_cache(self) -> KVCache:
        """The KV cache as plan_cache sizes it; a ModelLoadError naming the option to change when it can't be made."""
        shape = CacheShape.of(self._model)
        budget = cache_budget(self._device)
        options = self._options
        plan = plan_cache(shape, self.sequence_tokens, budget, options.max_batch_size, options.kv_cache_tokens)
        memory = self._device.type.upper()
        if not plan.holds_a_sequence:
            sequence = f"one sequence of {self.sequence_tokens} tokens"
            if options.kv_cache_tokens is not None:
                raise ModelLoadError(
                    f"{KV_CACHE_TOKENS_OPTION} {options.kv_cache_tokens} holds less than {sequence}: set it "
                    f"to at least {self.sequence_tokens}, or lower {MAX_SEQUENCE_TOKENS_OPTION}"
                )
            raise ModelLoadError(
                f"the {memory}'s free memory after loading ({max(0, budget) / 2**30:.1f} GiB for the KV cache) holds "
                f"less than {sequence}: lower {MAX_SEQUENCE_TOKENS_OPTION} or {MAX_BATCH_SIZE_OPTION}"
            )
        with_gather = plan.tokens * shape.bytes_per_token() + shape.gather_bytes(plan.slots, plan.slot_tokens)
        if plan.paged and options.kv_cache_tokens is not None and with_gather > budget:
            logger.warning(
                "%s %d: with the paged read's copy for a full batch the KV cache needs %.1f GiB, "
                "more than the %.1f GiB the %s's free memory leaves it: large batches may run out of memory; "
                "lower it or unset it",
                KV_CACHE_TOKENS_OPTION,
                options.kv_cache_tokens,
                with_gather / 2**30,
                max(0, budget) / 2**30,
                memory,
            )
        try:
            return KVCache(shape, plan, self._device)
        except torch.OutOfMemoryError:
            size = plan.tokens * shape.bytes_per_token() / 2**30
            raise ModelLoadError(
                f"the KV cache of {plan.tokens} tokens ({size:.1f} GiB) does not fit in the {memory}'s free memory: "
                f"lower {KV_CACHE_TOKENS_OPTION} or {MAX_BATCH_SIZE_OPTION}, or unset them (the defaults size the "
                f"cache from the free memory)"
            ) from None

    def _make_decoder(self) -> DecodeRunner:
        use_graphs = self._options.cuda_graphs and cuda_graphs_supported(self._device)
        # Capture and its check run on a pattern of tokens and positions (free slots, no request's keys are touched),
        # the positions within the shortest attention length the check uses.
        self._batch.tokens.copy_(torch.arange(self.slots) % int(self._model.config.vocab_size))
        pattern_positions = torch.arange(self.slots) % min(SHORTEST_LENGTH_BUCKET, self.sequence_tokens)
        self._batch.positions.copy_(pattern_positions)
        try:
            with self._cache.spread_for_capture():
                return make_decoder(self._forward_decode, use_graphs, self.slots, self.sequence_tokens)
        finally:
            self._batch.tokens.zero_()
            self._batch.positions.zero_()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
            self._text.stop()

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
    ) -> EngineRequest:
        """Queues a generation; `deliver` gets its chunks (and an error, if any) on the text thread. The caller
        keeps prompt + max_new_tokens within `sequence_tokens` (ModelService refuses longer prompts with the fix)."""
        if len(prompt_ids) + max_new_tokens > self.sequence_tokens:
            # Such a request would never get its blocks (or would run past its row): refuse it, never queue it.
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"{self.sequence_tokens} tokens of a sequence"
            )
        request = EngineRequest(
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=max_new_tokens,
            deliver=deliver,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_matcher=StopMatcher(params.stop),
            seed=random.getrandbits(63) if params.seed is None else params.seed % 2**63,
        )
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    # ---- engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                joining = self._take_new_requests()
                if joining is None:
                    return
                for group in _prefill_groups(joining):
                    self._run_safely(self._prefill, group, group)
                if self._batch.requests:  # rows just prefilled take part too: they already have their first token
                    self._run_safely(self._decode_step, list(self._batch.requests.values()))

    def _run_safely(self, work: Callable[..., None], requests: list[EngineRequest], *args: Any) -> None:
        """Runs one prefill or decode step; if it fails (e.g. out of memory) its requests get the error and leave
        the batch, and the engine keeps serving."""
        try:
            work(*args)
        except Exception as error:
            logger.exception("generation failed")
            self._text.put([(request, error) for request in requests])
            failed = set(requests)
            self._release([slot for slot, request in self._batch.requests.items() if request in failed])

    def _take_new_requests(self) -> list[EngineRequest] | None:
        """Requests that join the batch at this step boundary (waits while there is nothing to do); None: stop."""
        with self._wakeup:
            while not self._stopping and not self._batch.requests and not self._waiting:
                self._wakeup.wait()
            if self._stopping:
                return None
            in_flight = sum(request.tokens_in_flight for request in self._batch.requests.values())
            token_cap = self._options.max_batch_tokens
            free_blocks = self._cache.free_blocks
            joining: list[EngineRequest] = []
            while self._waiting and len(joining) < self._slots.free:
                request = self._waiting[0]
                if request.done.is_set():
                    self._waiting.popleft()
                    continue
                batch_is_empty = not self._batch.requests and not joining
                if token_cap is not None and in_flight + request.tokens_in_flight > token_cap and not batch_is_empty:
                    break
                blocks = self._cache.blocks_for(request.tokens_in_flight)
                if blocks > free_blocks:  # first come, first served: later requests wait too
                    break
                joining.append(self._waiting.popleft())
                in_flight += request.tokens_in_flight
                free_blocks -= blocks
            if not joining and not self._batch.requests and self._waiting:
                # With the batch empty every slot and block is free, so the first request always fits (submit saw
                # to its length). If it doesn't, some leaked: fail it loudly rather than spin on it.
                request = self._waiting.popleft()
                error = RuntimeError(
                    f"engine error: the KV cache has {self._slots.free} free slots and {self._cache.free_blocks} free "
                    f"blocks with no generation running, too few for a request of {request.tokens_in_flight} tokens"
                )
                logger.error("%s", error)
                self._text.put([(request, error)])
            return joining

    def _prefill(self, requests: list[EngineRequest]) -> None:
        """Runs the prompts together (right-padded) into free slots, samples each first token, and adds the
        requests that go on to the batch."""
        slots = [self._slots.take() for _ in requests]
        events: list[TokenEvent] = []
        finished: list[int] = []  # slots of the requests whose first token ends them
        try:  # until the batch holds the others, a failure here frees every slot (none would be freed otherwise)
            for slot, request in zip(slots, requests, strict=True):
                self._cache.assign(slot, request.tokens_in_flight)
            first_tokens = self._prefill_forward(slots, requests)
            host_tokens = first_tokens.tolist()
            going_on: list[int] = []  # indexes of the requests that join the batch
            for index, (slot, request) in enumerate(zip(slots, requests, strict=True)):
                if self._accept(request, host_tokens[index], events):
                    finished.append(slot)
                else:
                    going_on.append(index)
            if going_on:
                self._batch.add(
                    [slots[index] for index in going_on],
                    [requests[index] for index in going_on],
                    first_tokens[torch.tensor(going_on, device=self._device)],
                    [len(requests[index].prompt_ids) for index in going_on],
                )
        except BaseException:
            self._free(slots)
            raise
        self._free(finished)
        self._text.put(events)
        self._largest_batch = max(self._largest_batch, len(self._batch))

    def _prefill_forward(self, slots: list[int], requests: list[EngineRequest]) -> torch.Tensor:
        lengths = [len(request.prompt_ids) for request in requests]
        longest = max(lengths)
        input_ids = torch.tensor(
            [request.prompt_ids + [0] * (longest - len(request.prompt_ids)) for request in requests],
            device=self._device,
        )
        slot_index = torch.tensor(slots, device=self._device)
        length_tensor = torch.tensor(lengths, device=self._device)
        mask = self._cache.prepare_prefill(slot_index, length_tensor, longest)
        # Only the logits of each prompt's last token: the distinct last positions, then each row's own.
        last_positions = sorted(set(lengths))
        keep = torch.tensor([length - 1 for length in last_positions], device=self._device)
        logits = self._model(
            input_ids=input_ids,
            position_ids=torch.arange(longest, device=self._device).expand(len(requests), longest),
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        column = torch.tensor([last_positions.index(length) for length in lengths], device=self._device)
        row_logits = logits[torch.arange(len(requests), device=self._device), column]
        self._sampler.set_rows(
            slots,
            [request.params.temperature for request in requests],
            [request.params.top_k for request in requests],
            [request.params.top_p for request in requests],
            [request.seed for request in requests],
        )
        any_sampled = any(not request.params.greedy for request in requests)
        return self._sampler.sample(row_logits, slot_index, length_tensor - 1, any_sampled)

    def _forward_decode(self, batch: int, length: int) -> torch.Tensor:
        """The model's decode step over slots 0..batch-1 (what CUDA graphs capture): logits [batch, vocab]."""
        mask = self._cache.prepare_decode(self._batch.positions, batch, length)
        return self._model(
            input_ids=self._batch.tokens[:batch, None],
            position_ids=self._batch.positions[:batch, None],
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
        ).logits[:, -1]

    def _decode_step(self) -> None:
        self._release([slot for slot, request in self._batch.requests.items() if request.done.is_set()])
        if not self._batch.requests:
            return
        width, length = self._batch.width, self._batch.length
        logits = self._decoder.run(width, length)[:width]
        positions = self._batch.positions[:width]
        new_tokens = self._sampler.sample(logits, self._slot_index[:width], positions, self._batch.any_sampled)
        self._batch.advance(new_tokens, width)
        host_tokens = new_tokens.tolist()  # the step's one device-to-host copy
        self._decode_steps += 1
        self._largest_batch = max(self._largest_batch, len(self._batch))
        events: list[TokenEvent] = []
        finished = [
            slot for slot, request in self._batch.requests.items() if self._accept(request, host_tokens[slot], events)
        ]
        self._text.put(events)
        self._release(finished)

    def _accept(self, request: EngineRequest, token: int, events: list[TokenEvent]) -> bool:
        """Adds the token's event for the text thread; True when the request is finished (end-of-reply token or
        token budget)."""
        if token in self._eos_ids:
            events.append((request, None, "stop"))
            return True
        request.generated += 1
        finished = request.generated >= request.max_new_tokens
        events.append((request, token, "length" if finished else None))
        return finished

    def _release(self, slots: list[int]) -> None:
        self._batch.remove(slots)
        self._free(slots)

    def _free(self, slots: list[int]) -> None:
        for slot in slots:
            self._cache.release(slot)
            self._slots.give_back(slot)


def cuda_graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _prefill_groups(requests: list[EngineRequest]) -> list[list[EngineRequest]]:
    """The joining requests in arrival order, grouped so a group's padded prompts hold at most PREFILL_TOKENS."""
    groups: list[list[EngineRequest]] = []
    longest = 0
    for request in requests:
        length = len(request.prompt_ids)
        if groups and (len(groups[-1]) + 1) * max(longest, length) <= PREFILL_TOKENS:
            groups[-1].append(request)
            longest = max(longest, length)
        else:
            groups.append([request])
            longest = length
    return groups


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
