"""Which requests run: the waiting queue, admission at each step boundary, and which prompt tokens each step prefills.

Requests wait in arrival order. At each step boundary the ones that fit join, first come first served (a request
that does not fit makes the later ones wait too): each needs a free KV-cache slot, in a paged cache the blocks for
its prompt and token budget (inference_app.engine.block_manager), and room under the token cap of the batch. A
request joining takes its slot and blocks at once; they come back when it finishes, fails or is cancelled.

Chunked prefill: while requests are decoding, a step prefills at most `prefill_chunk_tokens` prompt tokens before its
decode step, so a running stream's gap between two tokens stays bounded whatever arrives. Whole prompts that fit the
budget are prefilled together (right-padded); a longer one is prefilled a chunk per step, alone, each chunk
attending to the earlier ones in the cache. With nothing decoding there is nobody to stall: the budget is then
PREFILL_TOKENS.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from inference_app.engine.block_manager import BlockManager
from inference_app.engine.request import EngineRequest

# Prompt tokens one step prefills while nothing is decoding (a longer prompt is prefilled in chunks of this size).
PREFILL_TOKENS = 8192


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions start..start+length-1 of one request (the earlier ones are in its slot already)."""

    request: EngineRequest
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.request.prompt_ids)


@dataclass
class ScheduledStep:
    """What the engine does at this step boundary, before the decode step over every running request."""

    prefill_groups: list[list[EngineRequest]] = field(default_factory=list)  # whole prompts, slots and blocks taken
    prefill_chunk: PrefillChunk | None = None  # or part of one longer prompt
    refused: list[tuple[EngineRequest, Exception]] = field(default_factory=list)  # requests that can never run


class Scheduler:
    """The waiting queue (filled from any thread) and the running requests by slot (engine thread only)."""

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int | None, prefill_chunk_tokens: int) -> None:
        self.block_manager = block_manager
        self.running: dict[int, EngineRequest] = {}  # slot -> request (holding a slot: prefilling or decoding)
        self._max_batch_tokens = max_batch_tokens  # prompt + max new tokens of the running requests; None: no cap
        self._prefill_chunk_tokens = prefill_chunk_tokens  # prompt tokens a step prefills while others decode
        self._prefilling: deque[EngineRequest] = deque()  # running, with prompt tokens not yet scheduled
        self._waiting: deque[EngineRequest] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False

    @property
    def waiting(self) -> int:
        with self._wakeup:
            return len(self._waiting)

    def add(self, request: EngineRequest) -> None:
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def schedule(self) -> ScheduledStep | None:
        """The requests that join at this step boundary (waits while there is nothing to do); None: stop."""
        with self._wakeup:
            while not self._stopping and not self.running and not self._waiting:
                self._wakeup.wait()
            if self._stopping:
                return None
            decoding = bool(self.decoding())  # before this step's prefills add to them
            self._prefilling.extend(self._admit())
            step = self._plan_prefill(self._prefill_chunk_tokens if decoding else PREFILL_TOKENS)
            if not self.running and self._waiting:
                step.refused.append(self._refuse_first())
            return step

    def decoding(self) -> list[EngineRequest]:
        """Running requests whose whole prompt is in the cache (or scheduled into it): the decode step's rows."""
        return [request for request in self.running.values() if request.prefilled == len(request.prompt_ids)]

    def cancelled(self) -> list[EngineRequest]:
        """Running requests their caller cancelled or the output thread stopped (a stop string, an error)."""
        return [request for request in self.running.values() if request.done.is_set()]

    def finish(self, requests: list[EngineRequest]) -> list[int]:
        """Gives back the slots and blocks of requests that ended (any already given back are skipped); returns
        the slots."""
        slots = []
        for request in requests:
            if request.slot is None:
                continue
            self.block_manager.free(request.slot)
            del self.running[request.slot]
            slots.append(request.slot)
            request.slot, request.blocks = None, []
            if request in self._prefilling:
                self._prefilling.remove(request)
        return slots

    def _plan_prefill(self, budget: int) -> ScheduledStep:
        """Prompt tokens for this step, first come first served, at most `budget`: whole prompts that fit, or else
        the next chunk of the first prompt (alone)."""
        whole: list[EngineRequest] = []
        left = budget
        while self._prefilling:
            request = self._prefilling[0]
            prompt = len(request.prompt_ids)
            if request.prefilled == 0 and prompt <= left:
                whole.append(self._prefilling.popleft())
                request.prefilled = prompt
                left -= prompt
                continue
            if whole:  # the next prompt waits for a later step
                break
            chunk = PrefillChunk(request, request.prefilled, min(prompt - request.prefilled, budget))
            request.prefilled += chunk.length
            if chunk.completes_prompt:
                self._prefilling.popleft()
            return ScheduledStep(prefill_chunk=chunk)
        return ScheduledStep(prefill_groups(whole, budget))

    def _admit(self) -> list[EngineRequest]:
        blocks = self.block_manager
        in_flight = sum(request.tokens_in_flight for request in self.running.values())
        joining: list[EngineRequest] = []
        while self._waiting and blocks.free_slots:
            request = self._waiting[0]
            if request.done.is_set():
                self._waiting.popleft()
                continue
            cap = self._max_batch_tokens
            if cap is not None and in_flight + request.tokens_in_flight > cap and self.running:
                break
            if blocks.blocks_for(request.tokens_in_flight) > blocks.free_blocks:
                break
            self._waiting.popleft()
            request.slot, request.blocks = blocks.allocate(request.tokens_in_flight)
            self.running[request.slot] = request
            joining.append(request)
            in_flight += request.tokens_in_flight
        return joining

    def _refuse_first(self) -> tuple[EngineRequest, Exception]:
        """With nothing running every slot and block is free, so the first request always fits (the engine refuses
        longer ones at submit). If it doesn't, some leaked: fail it loudly rather than spin on it."""
        request = self._waiting.popleft()
        error = RuntimeError(
            f"engine error: the KV cache has {self.block_manager.free_slots} free slots and "
            f"{self.block_manager.free_blocks} free blocks with no generation running, too few for a request of "
            f"{request.tokens_in_flight} tokens"
        )
        return request, error


def prefill_groups(requests: list[EngineRequest], budget: int = PREFILL_TOKENS) -> list[list[EngineRequest]]:
    """Whole prompts in arrival order, grouped so a group's padded prompts hold at most `budget` tokens."""
    groups: list[list[EngineRequest]] = []
    longest = 0
    for request in requests:
        length = len(request.prompt_ids)
        if groups and (len(groups[-1]) + 1) * max(longest, length) <= budget:
            groups[-1].append(request)
            longest = max(longest, length)
        else:
            groups.append([request])
            longest = length
    return groups
