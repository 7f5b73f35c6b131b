"""A workload that looks like users, through the app's engine in process (no HTTP).

- **mixed** (default): --requests requests with prompts from tens to ~3,000 tokens and replies from 16 to 512 tokens
  (both log-uniform, seeded, sampled at temperature 1), arriving at --rate requests/s (Poisson) or, with --rate 0,
  from --clients clients that each send their next request when the previous reply ends. Reports tokens/s, time to
  first token and time between tokens at p50/p95/p99, and the largest gap between two tokens of one reply.
- **stall** (--scenario stall): one reply streams while six ~3,000-token prompts arrive at once; reports the streaming
  reply's largest gap between two tokens until all six have their first token (what chunked prefill bounds).

The model is loaded the way the app loads it (`load_model`: folders on disk, the adapter merged into the weights,
one copy on the device; a generated random-weight model unless --model/--adapter) and the engine made as
ModelService makes it. Times are taken when the reply's text arrives (the output thread), as a client sees it;
a token that produced no text yet is counted with the next one that did.

    python -m bench.mixed --size small --scenario stall        # the CPU target: largest gap < 0.5 s
    python -m bench.mixed --size mini --clients 32 --rate 0     # on a GPU: p99 between tokens at 32 clients
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    add_model_arguments,
    describe_machine,
    format_table,
    machine_facts,
    percentile,
    prepare_model,
    write_results,
)

RUN_TIMEOUT_S = 1800
STALL_PROMPTS = 6
STALL_PROMPT_TOKENS = 3000
FILLER_WORDS = (
    "the model reads a long document about weather, rivers, cities, markets, music and the history of ships, "
    "then answers questions on what it has read; each paragraph adds numbers 17, 2048 and 3.14 to remember"
).split()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=48, help="requests in the mixed workload")
    parser.add_argument("--rate", type=float, default=0.0, help="arrivals per second (Poisson); 0: closed loop")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (with --rate 0)")
    parser.add_argument("--prompt-tokens", default="32,3000", help="prompt length range, log-uniform: MIN,MAX")
    parser.add_argument("--reply-tokens", default="16,512", help="reply length range, log-uniform: MIN,MAX")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, arrivals and sampling")
    parser.add_argument("--scenario", default="mixed", choices=("mixed", "stall", "both"), help="what to measure")
    parser.add_argument("--prefill-chunk-tokens", type=int, help="the engine's option (default: per device)")
    parser.add_argument("--kv-cache-tokens", type=int, help="the engine's option (default: from memory)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the engine's decode step eager")
    parser.add_argument("--quantize-4bit", action="store_true", help="load the base model in 4-bit (CUDA)")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default bench/mixed.json)")
    return parser.parse_args()


@dataclass
class Timeline:
    """One request's reply as the client sees it: when it was sent, and when each piece of text arrived."""

    sent_at: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, completion tokens so far)
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    request: Any = None  # the engine's request (to cancel it)

    def deliver(self, item: Any) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.finished.set()
            return
        if item.completion_tokens > self.tokens:  # the last chunk may bring no new token (an end-of-reply token)
            self.chunks.append((time.perf_counter(), item.completion_tokens))
        if item.finish_reason is not None:
            self.finished.set()

    @property
    def tokens(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.sent_at if self.chunks else None

    def token_gaps_s(self) -> list[float]:
        """Time between tokens: each chunk's wait spread over the tokens it brought."""
        gaps = []
        for (before, before_tokens), (at, tokens) in zip(self.chunks, self.chunks[1:], strict=False):
            gaps += [(at - before) / (tokens - before_tokens)] * (tokens - before_tokens)
        return gaps

    def largest_gap_s(self) -> float:
        times = [at for at, _ in self.chunks]
        return max((later - earlier for earlier, later in zip(times, times[1:], strict=False)), default=0.0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
        from inference_app.engine.model_loading import load_model
        from inference_app.settings import AdapterOption, Settings

        model = prepare_model(args)
        settings = Settings(
            model_path=model.model_path,
            adapters=(AdapterOption(None, model.adapter_path),),
            dtype=args.dtype,
            quantize_4bit=args.quantize_4bit,
        )
        started = time.perf_counter()
        self.loaded = load_model(settings)
        self.load_s = time.perf_counter() - started
        self.model_description = model.description
        options = EngineOptions(
            kv_cache_tokens=args.kv_cache_tokens,
            cuda_graphs=not args.no_cuda_graphs,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
        )
        started = time.perf_counter()
        self.engine = BatchingEngine(self.loaded, options)
        self.engine.start()
        self.filler = self._filler_tokens(STALL_PROMPT_TOKENS + 64)
        self.engine.warm_up(self.filler[:16])
        self.start_s = time.perf_counter() - started

    def _filler_tokens(self, count: int) -> list[int]:
        tokenizer = self.loaded.tokenizer
        rng = random.Random(1)
        ids: list[int] = []
        while len(ids) < count:
            text = " ".join(rng.choice(FILLER_WORDS) for _ in range(400))
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[:count]

    def prompt(self, tokens: int, rng: random.Random) -> list[int]:
        start = rng.randrange(len(self.filler) - tokens + 1)
        return self.filler[start : start + tokens]

    def submit(self, prompt: list[int], reply_tokens: int, seed: int) -> Timeline:
        from inference_app.engine.types import SamplingParams

        timeline = Timeline(time.perf_counter())
        params = SamplingParams(max_new_tokens=reply_tokens, temperature=1.0, seed=seed)
        timeline.request = self.engine.submit(prompt, params, reply_tokens, timeline.deliver)
        return timeline

    def close(self) -> None:
        self.engine.stop()


def log_uniform(rng: random.Random, bounds: str) -> int:
    low, high = (int(text) for text in bounds.split(","))
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def run_mixed(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    limit = bench.engine.sequence_tokens
    plan = []
    for index in range(args.requests):
        prompt_tokens = min(log_uniform(rng, args.prompt_tokens), len(bench.filler), limit - 16)
        reply_tokens = min(log_uniform(rng, args.reply_tokens), limit - prompt_tokens)
        plan.append((bench.prompt(prompt_tokens, rng), reply_tokens, args.seed * 1_000_003 + index))
    timelines: list[Timeline] = []
    lock = threading.Lock()
    started = time.perf_counter()
    if args.rate > 0:
        arrival = 0.0
        for prompt, reply_tokens, seed in plan:
            arrival += rng.expovariate(args.rate)
            time.sleep(max(0.0, started + arrival - time.perf_counter()))
            timelines.append(bench.submit(prompt, reply_tokens, seed))
    else:
        queue = list(reversed(plan))

        def client() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt, reply_tokens, seed = queue.pop()
                timeline = bench.submit(prompt, reply_tokens, seed)
                with lock:
                    timelines.append(timeline)
                timeline.finished.wait(RUN_TIMEOUT_S)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT_S)
    for timeline in timelines:
        if not timeline.finished.wait(RUN_TIMEOUT_S):
            raise TimeoutError(f"a request did not finish in {RUN_TIMEOUT_S} s")
        if timeline.error is not None:
            raise timeline.error
    seconds = time.perf_counter() - started
    ttfts = [timeline.ttft_s for timeline in timelines if timeline.ttft_s is not None]
    gaps = [gap for timeline in timelines for gap in timeline.token_gaps_s()]
    tokens = sum(timeline.tokens for timeline in timelines)
    return {
        "requests": len(timelines),
        "arrivals": f"Poisson, {args.rate}/s" if args.rate > 0 else f"{args.clients} closed-loop clients",
        "prompt_tokens": sum(len(prompt) for prompt, _, _ in plan),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        **{f"ttft_p{p}_s": percentile(ttfts, p / 100) for p in (50, 95, 99)},
        **{f"between_tokens_p{p}_s": percentile(gaps, p / 100) for p in (50, 95, 99)},
        "largest_gap_s": max((timeline.largest_gap_s() for timeline in timelines), default=None),
    }


def run_stall(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """A reply streams; six long prompts arrive at once; its largest gap until they all have a first token."""
    rng = random.Random(args.seed)
    streaming = bench.submit(bench.prompt(64, rng), bench.engine.sequence_tokens - 64, args.seed)
    deadline = time.perf_counter() + RUN_TIMEOUT_S
    while streaming.tokens < 8 and time.perf_counter() < deadline:  # it is running, its first steps done
        time.sleep(0.01)
    arrived = time.perf_counter()
    prompt_tokens = min(STALL_PROMPT_TOKENS, bench.engine.sequence_tokens - 16)  # the tiny model's context is 512
    prompts = [bench.prompt(prompt_tokens, rng) for _ in range(STALL_PROMPTS)]
    joining = [bench.submit(prompt, 16, args.seed + 1 + index) for index, prompt in enumerate(prompts)]
    while any(not timeline.chunks for timeline in joining) and time.perf_counter() < deadline:
        time.sleep(0.01)
    all_started = time.perf_counter()
    while streaming.chunks[-1][0] <= all_started and time.perf_counter() < deadline:  # its next token after that
        time.sleep(0.01)
    streaming.request.cancel()
    for timeline in joining:
        timeline.finished.wait(RUN_TIMEOUT_S)
    # The stream's tokens from its last one before the prompts arrived to its first one after all six started.
    times = [at for at, _ in streaming.chunks]
    first = max(index for index, at in enumerate(times) if at <= arrived)
    last = min(index for index, at in enumerate(times) if at > all_started)
    gaps = [later - earlier for earlier, later in zip(times[first:last], times[first + 1 : last + 1], strict=True)]
    return {
        "prompts": STALL_PROMPTS,
        "prompt_tokens": prompt_tokens,
        "seconds_until_all_started": all_started - arrived,
        "stream_tokens_meanwhile": last - first - 1,
        "stream_largest_gap_s": max(gaps),
        "stream_between_tokens_p50_s": percentile(gaps, 0.5),
        "joining_ttft_s": [timeline.ttft_s for timeline in joining],
    }


def main() -> None:
    args = parse_arguments()
    bench = Bench(args)
    facts = bench.engine.describe()
    print(f"loaded in {bench.load_s:.1f} s, engine ready in {bench.start_s:.1f} s: {facts['summary']}", flush=True)
    results: dict[str, Any] = {}
    try:
        if args.scenario in ("mixed", "both"):
            results["mixed"] = run_mixed(bench, args)
        if args.scenario in ("stall", "both"):
            results["stall"] = run_stall(bench, args)
    finally:
        bench.close()
    loaded = bench.loaded
    print(f"\nModel: {bench.model_description}, {loaded.device}, {loaded.dtype}")
    print(f"Machine: {describe_machine(machine_facts())}")
    print(f"Engine: {facts['summary']}\n")
    if "mixed" in results:
        print_mixed(results["mixed"])
    if "stall" in results:
        print_stall(results["stall"])
    path = write_results(
        __file__,
        {
            "model": bench.model_description,
            "device": loaded.device,
            "dtype": loaded.dtype,
            "load_s": bench.load_s,
            "engine_start_s": bench.start_s,
            "engine": facts,
            **results,
        },
        path=args.json,
    )
    print(f"\nJSON: {path}")


def print_stall(results: dict[str, Any]) -> None:
    headers = ["prompts arriving", "until all started s", "stream tokens meanwhile", "largest gap s", "gap p50 s"]
    row = [
        f"{results['prompts']} x {results['prompt_tokens']} tokens",
        results["seconds_until_all_started"],
        results["stream_tokens_meanwhile"],
        results["stream_largest_gap_s"],
        results["stream_between_tokens_p50_s"],
    ]
    print(format_table(headers, [row]))
    print(f"\nCPU target (--size small): largest gap < 0.5 s: {results['stream_largest_gap_s']:.3f} s\n")


def print_mixed(results: dict[str, Any]) -> None:
    headers = ["requests", "arrivals", "tokens/s", "TTFT p50/p95/p99 s", "between tokens p50/p95/p99 s"]
    row = [
        results["requests"],
        results["arrivals"],
        results["tokens_per_s"],
        "/".join(f"{results[f'ttft_p{p}_s']:.3f}" for p in (50, 95, 99)),
        "/".join(f"{results[f'between_tokens_p{p}_s']:.3f}" for p in (50, 95, 99)),
    ]
    print(format_table(headers, [row]))
    print(f"\nlargest gap between two tokens of one reply: {results['largest_gap_s']:.3f} s\n")


if __name__ == "__main__":
    main()
