"""The engine loop: one thread runs every generation, sharing each forward pass among the requests in flight.

Each step: schedule (inference_app.engine.scheduler: which waiting requests join, with their KV-cache slots and
blocks, and which prompt tokens this step prefills: whole prompts together, or a chunk of a longer one, within a
budget while others decode), run (inference_app.engine.model_runner: that prefill, then one decode step that
produces the next token of every decoding request at once), accept (each token ends its request or goes on; the
tokens become text on the output thread, inference_app.engine.output_processor, off the step's critical path). Each
request keeps its own sampling settings, seed, stop strings and token budget.

The transformers continuous-batching API (`generate_batch` / `init_continuous_batching`) was not used: it samples
with one do_sample and seed setting for the whole batch and has no stop strings.
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inference_app.engine.block_manager import BlockManager
from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from inference_app.engine.grammar import GrammarMatcher, Grammars
from inference_app.engine.kv_cache import allocate_kv_cache
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.model_runner import ModelRunner, StepTokens, default_prefill_chunk_tokens
from inference_app.engine.output_processor import OutputProcessor
from inference_app.engine.request import EngineRequest, TokenEvent
from inference_app.engine.scheduler import PrefillChunk, Scheduler
from inference_app.engine.types import GenerationChunk, SamplingParams, TokenLogprobs

logger = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 600


@dataclass(frozen=True)
class EngineOptions:
    max_batch_size: int | None = None  # KV-cache slots; None: 64, fewer on a GPU too small (cache_plan.plan_cache)
    max_batch_tokens: int | None = None  # prompt + max new tokens of the requests in flight; None: no cap
    max_sequence_tokens: int | None = None  # tokens of a sequence (prompt + reply); None: the model's context
    kv_cache_tokens: int | None = None  # tokens the KV cache holds in all; None: as many as memory holds
    cuda_graphs: bool = True  # on CUDA; the CPU always runs eager
    prefill_chunk_tokens: int | None = None  # prompt tokens a step prefills while others decode; None: per device


class BatchingEngine:
    """Runs all generations on one thread, sharing each decode step among the requests in the batch.

    Made, it holds the KV cache (a ModelLoadError naming the option to change when the cache can't be made) and
    queues requests; start() captures the CUDA graphs and starts the engine and output threads."""

    def __init__(self, loaded: LoadedModel, options: EngineOptions) -> None:
        self._model = loaded.model
        self._row_models = loaded.row_models
        self._default_model = loaded.default_model
        self._device = torch.device(loaded.device)
        # The engine streams text on its own thread: a private copy avoids sharing the Rust tokenizer across threads.
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self._eos_ids = frozenset(_eos_token_ids(loaded))
        self.vocab_size = int(self._model.config.vocab_size)
        self._grammars = Grammars(self._tokenizer, self.vocab_size, self._eos_ids)
        self._options = options
        # A KV-cache row holds a whole sequence (prompt + reply): by default the model's context.
        self.sequence_tokens = min(loaded.context_length, options.max_sequence_tokens or loaded.context_length)
        self._cache = allocate_kv_cache(
            self._model, self._device, self.sequence_tokens, options.max_batch_size, options.kv_cache_tokens
        )
        self.prefill_chunk_tokens = options.prefill_chunk_tokens or default_prefill_chunk_tokens(self._device)
        self._scheduler = Scheduler(BlockManager(self._cache.plan), options.max_batch_tokens, self.prefill_chunk_tokens)
        self._runner: ModelRunner  # set by start()
        self._output = OutputProcessor()
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._largest_batch = 0
        self._decode_steps = 0
        self._prefill_chunks = 0

    @property
    def slots(self) -> int:
        """Requests that can run at once (KV-cache slots)."""
        return self._cache.plan.slots

    def describe(self) -> dict[str, Any]:
        """The KV cache and the decode mode (known after start()), for logs and benchmarks."""
        cache, decode = self._cache, self._runner.decoder.description
        return {
            "slots": cache.plan.slots,
            "slot_tokens": cache.plan.slot_tokens,
            "kv_cache_tokens": cache.tokens,
            "paged": cache.plan.paged,
            "kv_cache_bytes": cache.bytes,
            "decode": decode,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "summary": f"{cache.describe()}, decode step {decode}, prefill chunks of {self.prefill_chunk_tokens}",
        }

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self._scheduler.running),
            "waiting": self._scheduler.waiting,
            "largest_batch": self._largest_batch,
            "free_kv_blocks": self._scheduler.block_manager.free_blocks,
            "decode_steps": self._decode_steps,
            "prefill_chunks": self._prefill_chunks,
        }

    def start(self) -> None:
        """Captures the CUDA graphs (on CUDA) and starts the engine and output threads."""
        options = self._options
        self._runner = ModelRunner(self._model, self._cache, self._device, options.cuda_graphs, self._row_models)
        logger.info("generation engine: %s", self.describe()["summary"])
        self._output.start()
        self._thread.start()

    def stop(self) -> None:
        self._scheduler.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
            self._output.stop()

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

    def grammar_matcher(self, grammar: str) -> GrammarMatcher:
        """A matcher for `grammar` to submit with (compiled on the caller's thread, or taken from the cache);
        raises GrammarError (a ValueError) naming what cannot be built."""
        return self._grammars.matcher(grammar)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        deliver: Callable[[GenerationChunk | BaseException], None],
        grammar: GrammarMatcher | None = None,
        model: int | None = None,
    ) -> EngineRequest:
        """Queues a generation of `model` (an index into LoadedModel.model_ids; None: the default model); `deliver`
        gets its chunks (and an error, if any) on the output thread. The caller keeps prompt + max_new_tokens within
        `sequence_tokens` (ModelService refuses longer prompts with the fix), and passes grammar_matcher(params.grammar)
        when the request has a grammar."""
        if (grammar is None) != (params.grammar is None):
            raise ValueError("a request with a grammar needs its matcher (grammar_matcher), and only such a request")
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
            grammar=grammar,
            model=self._default_model if model is None else model,
        )
        self._scheduler.add(request)
        return request

    # ---- engine thread: schedule -> run -> accept ----

    def _run(self) -> None:
        with torch.inference_mode():
            while (step := self._scheduler.schedule()) is not None:
                for request, error in step.refused:
                    logger.error("%s", error)
                    self._output.put([(request, error)])
                for group in step.prefill_groups:
                    self._run_safely(functools.partial(self._prefill, group), group)
                if (chunk := step.prefill_chunk) is not None:
                    self._run_safely(functools.partial(self._prefill_chunk, chunk), [chunk.request])
                # Rows just prefilled take part too: they already have their first token.
                self._release(self._scheduler.cancelled())
                if decoding := self._scheduler.decoding():
                    self._run_safely(functools.partial(self._decode, decoding), decoding)

    def _run_safely(self, work: Callable[[], None], requests: list[EngineRequest]) -> None:
        """Runs one prefill or decode step; if it fails (e.g. out of memory) its requests get the error and leave
        the batch, and the engine keeps serving."""
        try:
            work()
        except Exception as error:
            logger.exception("generation failed")
            self._output.put([(request, error) for request in requests])
            self._release(requests)

    def _prefill(self, requests: list[EngineRequest]) -> None:
        try:
            first_tokens = self._runner.prefill(requests)
        except Exception:
            if len(requests) == 1:
                raise
            # One request's fault (a setting the device cannot take, a prompt that breaks the model) must not fail
            # the others: each is prefilled again alone, and only one that fails alone gets the error.
            logger.exception("a prefill of %d requests failed; prefilling each alone", len(requests))
            for request in requests:
                self._run_safely(functools.partial(self._prefill, [request]), [request])
            return
        self._accept(requests, first_tokens)

    def _prefill_chunk(self, chunk: PrefillChunk) -> None:
        first = self._runner.prefill_chunk(chunk.request, chunk.start, chunk.length)
        self._prefill_chunks += 1
        if first is not None:
            self._accept([chunk.request], first)

    def _decode(self, requests: list[EngineRequest]) -> None:
        tokens, logprobs = self._runner.decode()
        self._decode_steps += 1
        self._largest_batch = max(self._largest_batch, len(requests))
        slots = [_slot(request) for request in requests]
        self._accept(requests, ([tokens[slot] for slot in slots], logprobs and [logprobs[slot] for slot in slots]))

    def _accept(self, requests: list[EngineRequest], step: StepTokens) -> None:
        """Hands each request's new token to the output thread; the requests it ends leave the batch."""
        tokens, logprobs = step
        events: list[TokenEvent] = []
        finished = [
            request
            for request, token, token_logprobs in zip(requests, tokens, logprobs or [None] * len(tokens), strict=True)
            if self._accept_token(request, token, token_logprobs, events)
        ]
        self._output.put(events)
        self._release(finished)

    def _accept_token(
        self, request: EngineRequest, token: int, logprobs: TokenLogprobs | None, events: list[TokenEvent]
    ) -> bool:
        """Adds the token's event for the output thread; True when the request is finished (end-of-reply token,
        token budget, or the end of its grammar)."""
        if token in self._eos_ids:
            events.append((request, None, "stop", None))
            return True
        request.generated += 1
        grammar_ended = request.grammar is not None and not request.grammar.accept(token)
        if grammar_ended or request.generated >= request.max_new_tokens:
            events.append((request, token, "stop" if grammar_ended else "length", logprobs))
            return True
        events.append((request, token, None, logprobs))
        return False

    def _release(self, requests: list[EngineRequest]) -> None:
        self._runner.remove(self._scheduler.finish(requests))


def _slot(request: EngineRequest) -> int:
    assert request.slot is not None, "a running request holds its slot"
    return request.slot


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
