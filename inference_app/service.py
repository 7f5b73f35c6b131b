"""The ModelService the web layers talk to (loading, prompts, concurrency limit, streaming).

The generations themselves run on the engine (inference_app.engine.engine_loop), where concurrent requests share
forward passes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Literal

from inference_app.engine.types import (
    FinishReason,
    GenerationChunk,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
)
from inference_app.settings import Settings

if TYPE_CHECKING:
    from inference_app.engine.engine_loop import BatchingEngine
    from inference_app.engine.model_loading import LoadedModel

# torch, transformers and peft are imported by the loading thread, not here: the web layers import this module
# and start serving /health while those heavy imports run.

logger = logging.getLogger(__name__)

# The web layers import these from here.
__all__ = [
    "CapacityExceededError",
    "FinishReason",
    "GenerationChunk",
    "InvalidRequestError",
    "ModelFailedError",
    "ModelLoadingError",
    "ModelNotReadyError",
    "ModelService",
    "PromptTooLongError",
    "SamplingParams",
    "TokenLogprob",
    "UnknownModelError",
    "encode_prompt",
    "plain_template_prompt",
]

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
ROLES = ("system", "user", "assistant")
# At most this many messages in a conversation: more than fit Phi-3-mini-4k's context, where each message takes at
# least four tokens of the chat template. The API refuses more while parsing, before it validates each message.
MAX_MESSAGES = 2048
# More characters than any one token of Phi-3's vocabulary (the longest are runs of 16 spaces) or of the tests'
# tokenizer covers: a prompt with more characters than this many per token of context cannot fit.
MAX_CHARS_PER_TOKEN = 16


class PromptTooLongError(InvalidRequestError):
    """The prompt leaves no room in the model's context for a reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "messages")


class CapacityExceededError(RuntimeError):
    """All generation slots are busy (the API answers 429 with Retry-After)."""


class UnknownModelError(LookupError):
    """The request names a model this server does not serve (the API answers 404 model_not_found)."""


class ModelNotReadyError(RuntimeError):
    """The model is not loaded; the message says why."""


class ModelLoadingError(ModelNotReadyError):
    """The model is still loading."""


class ModelFailedError(ModelNotReadyError):
    """Loading failed; the message is the reason (it names the path and the option to fix)."""


class ModelService:
    """Owns loading in the background and generation; the only object the web layers talk to."""

    def __init__(self, settings: Settings, prepare: Callable[[], None] | None = None) -> None:
        """`prepare` runs first on the loading thread (the demo builds its model there)."""
        self.settings = settings
        self._prepare = prepare
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.failure_reason: str | None = None
        self.load_timings: dict[str, float] = {}  # seconds per loading phase, for logs and the cold-start bench
        self._loaded: LoadedModel | None = None
        self._engine: BatchingEngine | None = None
        self._concurrency: _ConcurrencyLimit | None = None  # sized once the engine knows its KV cache
        self._loading_done = threading.Event()

    # ---- loading ----

    def start_loading(self) -> None:
        """Loads model and adapter in a background thread; returns at once."""
        threading.Thread(target=self._load, name="model-loading", daemon=True).start()

    def wait_until_loaded(self, timeout: float) -> str:
        """Blocks until loading succeeded or failed, or `timeout` seconds passed; returns the status."""
        self._loading_done.wait(timeout)
        return self.status

    def _load(self) -> None:
        from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
        from inference_app.engine.model_loading import ModelLoadError, load_model

        try:
            if self._prepare is not None:
                self._prepare()
            loaded = load_model(self.settings)
            started = time.perf_counter()
            engine = BatchingEngine(
                loaded,
                EngineOptions(
                    max_batch_size=self.settings.max_batch_size,
                    max_batch_tokens=self.settings.max_batch_tokens,
                    max_sequence_tokens=self.settings.max_sequence_tokens,
                    kv_cache_tokens=self.settings.kv_cache_tokens,
                    cuda_graphs=self.settings.cuda_graphs,
                    prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
                ),
            )
            engine.start()
            engine_started = time.perf_counter()
            try:
                engine.warm_up(encode_prompt(loaded.tokenizer, _WARM_UP_MESSAGES, self.settings.prompt_template))
            except BaseException:
                engine.stop()
                raise
            self.load_timings = {
                **loaded.timings,
                "kv_cache_and_graphs": engine_started - started,
                "warmup": time.perf_counter() - engine_started,
            }
            self._concurrency = _ConcurrencyLimit(self.settings.max_concurrent_generations or engine.slots)
            self._loaded, self._engine = loaded, engine
            logger.info("generations at once: %d", self._concurrency.limit)
            self.status = "ready"
            logger.info("model ready: %s (%s)", self.info(), _format_timings(self.load_timings))
        except ModelLoadError as error:
            self._fail(str(error))
        except Exception as error:  # anything unexpected must still end in "failed", never in a hung "loading"
            logger.exception("model loading failed")
            self._fail(f"unexpected error while loading the model: {type(error).__name__}: {error}")
        finally:
            self._loading_done.set()

    def _fail(self, reason: str) -> None:
        self.failure_reason = reason
        self.status = "failed"
        logger.error("model loading failed: %s", reason)

    def close(self) -> None:
        """Stops the engine thread (tests and benchmarks; the server simply exits)."""
        if self._engine is not None:
            self._engine.stop()

    # ---- information ----

    def info(self) -> dict[str, Any]:
        loaded = self._require_loaded()
        return {
            "model_id": loaded.model_ids[0],
            "adapter_ids": list(loaded.model_ids[1:]),
            "device": loaded.device,
            "dtype": loaded.dtype,
            "context_length": loaded.context_length,
        }

    def served_model_id(self) -> str:
        """The model of a request that names none: the first adapter, or the base model in base-only mode (known
        before loading, as are the others)."""
        return self.settings.served_model_id

    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (what logit_bias may name)."""
        return self._require_engine().vocab_size

    def model_ids(self) -> tuple[str, ...]:
        """Every model served: the base model, then each adapter."""
        return self.settings.model_ids

    def resolve_model(self, model_id: str | None) -> str:
        """The served model a request runs: the one it names, or the default; UnknownModelError naming the
        choices for a name not served."""
        if model_id is None:
            return self.served_model_id()
        if model_id not in self.model_ids():
            raise UnknownModelError(
                f"the model {model_id!r} does not exist here: choose one of {', '.join(self.model_ids())} "
                f"(GET /v1/models lists them)"
            )
        return model_id

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return len(self._prompt_ids(messages))

    def generation_stats(self) -> dict[str, int]:
        """Engine counters: requests running and waiting, the largest batch so far, decode steps run."""
        return self._require_engine().stats()

    # ---- generation ----

    async def stream_chat(
        self, messages: list[Message], params: SamplingParams, *, wait: bool, model: str | None = None
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Streams the reply of `model` (a served model's id; None: the default) to `messages`; the last chunk has a
        finish_reason.

        Every check of a request is made here, for the API and the UI alike. Raises (at the first iteration, before
        generating) UnknownModelError, ModelNotReadyError, InvalidRequestError naming the field at fault (a bad
        message, top_k beyond the vocabulary), PromptTooLongError, and CapacityExceededError when all slots are busy
        and wait is False. Closing the iterator (client gone, task cancelled) stops the generation and frees its slot.
        """
        model_index = self.model_ids().index(self.resolve_model(model))
        engine = self._require_engine()
        concurrency = self._concurrency
        assert concurrency is not None  # set with the engine
        vocabulary = self._require_loaded().vocab_size
        if params.top_k is not None and params.top_k > vocabulary:
            raise InvalidRequestError(f"invalid 'top_k': must be at most {vocabulary}, the model's vocabulary", "top_k")
        check_messages(messages)
        self._refuse_overlong(messages)
        # On a worker thread: a long prompt takes a while to template and tokenize, and the event loop serves /health.
        prompt_ids = await asyncio.to_thread(self._prompt_ids, messages)
        max_new_tokens = self._max_new_tokens(len(prompt_ids), params.max_new_tokens)
        # Compiled on a worker thread too (a new grammar takes milliseconds, a cached one microseconds).
        grammar = None if params.grammar is None else await asyncio.to_thread(engine.grammar_matcher, params.grammar)
        if wait:
            await concurrency.acquire()
        elif not concurrency.try_acquire():
            raise CapacityExceededError(f"all {concurrency.limit} generation slots are busy; retry shortly")
        try:
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

            def deliver(item: GenerationChunk | BaseException) -> None:  # called on the engine thread
                try:
                    loop.call_soon_threadsafe(chunks.put_nowait, item)
                except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
                    request.cancel()

            request = engine.submit(prompt_ids, params, max_new_tokens, deliver, grammar, model=model_index)
            try:
                while True:
                    item = await chunks.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        return
            finally:
                request.cancel()
        finally:
            concurrency.release()

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            if self.failure_reason is not None:
                raise ModelFailedError(self.failure_reason)
            raise ModelLoadingError("the model is still loading")
        return self._loaded

    def _require_engine(self) -> BatchingEngine:
        self._require_loaded()
        assert self._engine is not None
        return self._engine

    def _refuse_overlong(self, messages: list[Message]) -> None:
        """Refuses, before templating and tokenizing (which take seconds for megabytes of text or tens of thousands
        of messages), a conversation that cannot fit whatever its tokens: each message takes at least one token (its
        role marker or separator), and each token covers at most MAX_CHARS_PER_TOKEN characters."""
        context_length = self._require_loaded().context_length
        characters = sum(len(message["content"]) for message in messages)
        if characters + len(messages) * MAX_CHARS_PER_TOKEN > context_length * MAX_CHARS_PER_TOKEN:
            raise PromptTooLongError(
                f"the conversation has {len(messages)} messages and {characters} characters, more than the model's "
                f"context of {context_length} tokens can hold (each message takes at least one token, and a token "
                f"holds at most {MAX_CHARS_PER_TOKEN} characters): shorten the conversation"
            )

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        return encode_prompt(self._require_loaded().tokenizer, messages, self.settings.prompt_template)

    def _max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        context_length = self._require_loaded().context_length
        sequence_tokens = self._require_engine().sequence_tokens
        room = sequence_tokens - prompt_tokens
        if room < 1:
            holder = (
                f"the model's context holds {context_length}"
                if sequence_tokens == context_length
                else f"this server's sequences hold {sequence_tokens} (--max-sequence-tokens)"
            )
            raise PromptTooLongError(f"the prompt has {prompt_tokens} tokens and {holder}: shorten the conversation")
        return min(requested, self.settings.max_new_tokens_cap, room)


_WARM_UP_MESSAGES = [{"role": "user", "content": "Hello"}]


def encode_prompt(tokenizer: Any, messages: list[Message], prompt_template: str | None) -> list[int]:
    """The prompt's token ids: the tokenizer's chat template, or the plain prompt template when one is set."""
    check_messages(messages)
    if prompt_template is None:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(plain_template_prompt(messages, prompt_template))["input_ids"])


def check_messages(messages: list[Message]) -> None:
    """Refuses more than MAX_MESSAGES messages, and a message without a known role or text content, naming it."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(
            f"invalid 'messages': at most {MAX_MESSAGES} messages are accepted, got {len(messages)}: shorten the "
            "conversation",
            "messages",
        )
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise InvalidRequestError(
                f"invalid 'messages[{index}]': each message needs a role in {ROLES} and text content",
                f"messages[{index}]",
            )


def plain_template_prompt(messages: list[Message], template: str) -> str:
    """The prompt for adapters trained on a plain template such as '### Question: {}\\n### Answer:'.

    System text comes first as is, each user turn goes through the template, and each assistant turn follows
    as the answer; parts are joined by newlines.
    """
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(template.replace("{}", message["content"]))
        else:
            parts.append(message["content"])
    return "\n".join(parts)


def _format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in timings.items())


class _ConcurrencyLimit:
    """The limit on generations at once (--max-concurrent-generations): a counting semaphore usable from any thread
    and any event loop (waiters are served first come first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._used < self.limit and not self._waiters:
                self._used += 1
                return True
            return False

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._used < self.limit and not self._waiters:
                self._used += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                    raise
            # The slot was handed over just as the wait was cancelled: give it back (unless _hand_over will).
            if not waiter.cancelled():
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            if not self._waiters:
                self._used -= 1
                return
            loop, waiter = self._waiters.popleft()  # the slot passes straight to the next waiter
        loop.call_soon_threadsafe(self._hand_over, waiter)

    def _hand_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self.release()
        else:
            waiter.set_result(None)
