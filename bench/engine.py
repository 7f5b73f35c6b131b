"""The batching engine in process (no HTTP): tokens/s and time to first token at several concurrency levels.

At each level (default 1, 8, 32, 64 concurrent requests, all sent at once, greedy, the same prompt) it measures
- the app's engine (`inference_app.engine.engine_loop.BatchingEngine` on the merged model, as the app serves it),
- a plain batched `model.generate` of the same merged model (one call with the batch, no padding), and
- the AI Toolkit's way (unmerged `PeftModel`, a `generate` thread per request with `TextIteratorStreamer`,
  bench/toolkit_model.py),
and prints one table (best of --runs for the engine and `generate`; one run for the toolkit, whose replies are
--toolkit-new-tokens long so that 64 threads of it finish in seconds rather than minutes on a GPU) plus the
engine's load and CUDA-graph capture time, and writes one JSON. One copy of the model is on the device: the toolkit's
levels run first on the unmerged model, which is then merged in place (as the app merges) before the engine sizes its
KV cache from the free memory. For prompts and replies of mixed lengths arriving over time, see bench/mixed.py.

The model is built in memory with random weights (the test factory's Phi-3-family shapes; `mini` is the real
Phi-3-mini shape, built on the GPU in seconds) with a random rank-64 LoRA adapter; nothing is read from disk or
downloaded. Needs only torch, transformers and peft.

    python -m bench.engine --size tiny                               # the CPU target: engine >= 0.8x generate at 64
    python -m bench.engine --size mini --json bench/engine-mini.json # on a GPU (about 2-4 minutes)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_MESSAGES,
    describe_machine,
    format_table,
    machine_facts,
    percentile,
    ratio,
    write_results,
)
from bench.toolkit_model import ToolkitStyleModel

RUN_TIMEOUT_S = 600


@dataclass
class Run:
    seconds: float  # all requests sent -> last token
    ttfts_s: list[float]  # per request: sent -> first token
    tokens: int  # new tokens, all requests together

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def add_engine_arguments(parser: argparse.ArgumentParser, levels: str) -> None:
    """The model, the levels and the engine's options (this script's and bench/adapters.py's)."""
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "mini"), help="model shape")
    parser.add_argument("--levels", default=levels, help="concurrent requests, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per level (best kept), after a warm-up")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the engine's decode step eager")
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="the engine's KV cache size in tokens (fewer than 64 whole sequences: paged)",
    )
    parser.add_argument("--json", type=Path, help="where to write the JSON (default: bench/<script>.json)")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, levels="1,8,32,64")
    parser.add_argument("--toolkit-new-tokens", type=int, default=16, help="new tokens per toolkit request")
    parser.add_argument("--no-toolkit", action="store_true", help="skip the toolkit's way")
    return parser.parse_args()


# ---------------------------------------------------------------- the models


@dataclass
class BenchModels:
    model: Any  # the toolkit's unmerged PeftModel until merge(), then the merged model the app serves
    tokenizer: Any
    device: str
    build_s: float

    def merge(self) -> None:
        """Merges the adapter in place, as the app does: no second copy of the weights."""
        self.model = self.model.merge_and_unload().eval()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def build_models(size: str) -> BenchModels:
    from peft import get_peft_model
    from transformers import Phi3ForCausalLM

    from inference_app.demo.random_model import SIZES, build_tokenizer, generation_config, lora_config, phi3_config
    from inference_app.engine.model_loading import resolve_dtype

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype("auto", device)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder), SIZES[size].vocab_size)
    config = phi3_config(SIZES[size], tokenizer, dtype)
    torch.manual_seed(0)
    with torch.device(device):  # random init where the weights live: seconds for the 3.8B shape on a GPU
        base = Phi3ForCausalLM._from_config(config, dtype=dtype)
    base.generation_config = generation_config(tokenizer, config)
    torch.manual_seed(1)
    unmerged = get_peft_model(base, lora_config(size)).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    return BenchModels(unmerged, tokenizer, device, time.perf_counter() - started)


def loaded_model(model: Any, models: BenchModels, model_ids: tuple[str, ...], row_models: Any = None) -> Any:
    """`model` as model_loading.load_model hands it to the engine (the default model: the last id)."""
    from inference_app.engine.model_loading import LoadedModel

    return LoadedModel(
        model=model,
        tokenizer=models.tokenizer,
        model_ids=model_ids,
        default_model=len(model_ids) - 1,
        row_models=row_models,
        device=models.device,
        dtype=str(model.dtype).removeprefix("torch."),
        context_length=int(model.config.max_position_embeddings),
        timings={},
    )


# ---------------------------------------------------------------- the three ways


class EngineWay:
    """The app's engine as ModelService starts it, with the app's defaults (KV cache sized from memory, CUDA
    graphs, warm-up): levels beyond its slots wait in its queue, as they would in the app."""

    def __init__(
        self,
        models: BenchModels,
        args: argparse.Namespace,
        loaded: Any = None,
        request_models: tuple[int | None, ...] = (None,),
    ) -> None:
        """`loaded`: the LoadedModel to serve (default: the merged model alone); the requests of a run ask for the
        served models in `request_models` in turn (None: the default model)."""
        from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
        from inference_app.service import encode_prompt

        self.prompt_ids = encode_prompt(models.tokenizer, BENCH_MESSAGES, None)
        started = time.perf_counter()
        options = EngineOptions(cuda_graphs=not args.no_cuda_graphs, kv_cache_tokens=args.kv_cache_tokens)
        self.engine = BatchingEngine(loaded or loaded_model(models.model, models, (f"bench-{args.size}",)), options)
        self.engine.start()
        self.engine.warm_up(self.prompt_ids)
        self.start_s = time.perf_counter() - started
        self.new_tokens = args.new_tokens
        self.request_models = request_models

    def run(self, clients: int) -> Run:
        from inference_app.engine.types import GenerationChunk, SamplingParams

        params = SamplingParams(max_new_tokens=self.new_tokens, temperature=0)
        lock = threading.Lock()
        first_at: list[float] = []
        tokens: list[int] = []
        errors: list[BaseException] = []
        done = threading.Semaphore(0)

        def deliver(item: GenerationChunk | BaseException, state: dict[str, bool]) -> None:
            now = time.perf_counter()
            with lock:
                if isinstance(item, BaseException):
                    errors.append(item)
                    done.release()
                    return
                if not state["started"]:
                    state["started"] = True
                    first_at.append(now)
                if item.finish_reason is not None:
                    tokens.append(item.completion_tokens)
                    done.release()

        started = time.perf_counter()
        for client in range(clients):
            state = {"started": False}
            model = self.request_models[client % len(self.request_models)]
            self.engine.submit(
                self.prompt_ids, params, self.new_tokens, functools.partial(deliver, state=state), model=model
            )
        for _ in range(clients):
            if not done.acquire(timeout=RUN_TIMEOUT_S):
                raise TimeoutError(f"the engine did not finish {clients} requests in {RUN_TIMEOUT_S} s")
        seconds = time.perf_counter() - started
        if errors:
            raise errors[0]
        return Run(seconds, [at - started for at in first_at], sum(tokens))

    def close(self) -> None:
        self.engine.stop()


class GenerateWay:
    """A plain batched `model.generate` (the same prompt in every row, so no padding), greedy."""

    def __init__(self, models: BenchModels, args: argparse.Namespace) -> None:
        self.model = models.model
        encoded: Any = models.tokenizer.apply_chat_template(
            BENCH_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        self.inputs = encoded.to(models.device)
        self.eos_ids = set(models.model.generation_config.eos_token_id)
        self.new_tokens = args.new_tokens

    def run(self, clients: int) -> Run:
        from transformers.generation.streamers import BaseStreamer

        class FirstTokenTimer(BaseStreamer):
            def __init__(self) -> None:
                self.calls = 0
                self.first_token_at: float | None = None

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:  # the first call hands over the prompt
                    value.tolist()  # waits for the device, so the time is when the token exists
                    self.first_token_at = time.perf_counter()

            def end(self) -> None:
                pass

        inputs = {name: tensor.repeat(clients, 1) for name, tensor in self.inputs.items()}
        timer = FirstTokenTimer()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.new_tokens, do_sample=False, streamer=timer)
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        seconds = time.perf_counter() - started
        assert timer.first_token_at is not None
        tokens = sum(_tokens_before_end(row, self.eos_ids) for row in new)
        return Run(seconds, [timer.first_token_at - started] * clients, tokens)

    def close(self) -> None:
        pass


def _tokens_before_end(row: list[int], eos_ids: set[int]) -> int:
    """New tokens of a generate row up to its first end-of-reply token (the rest is padding)."""
    return next((index for index, token in enumerate(row) if token in eos_ids), len(row))


class ToolkitWay:
    """The toolkit's way: a `generate` thread per request on the unmerged PeftModel, streamed."""

    def __init__(self, models: BenchModels, args: argparse.Namespace) -> None:
        self.toolkit = ToolkitStyleModel(models.model, models.tokenizer, True, "bench", models.device)
        self.user_text = BENCH_MESSAGES[-1]["content"]
        self.new_tokens = args.toolkit_new_tokens

    def run(self, clients: int) -> Run:
        first_at: list[float] = []
        tokens: list[int] = []
        lock = threading.Lock()

        def one() -> None:
            seen_text = False
            for piece in self.toolkit.stream(self.user_text, self.new_tokens, 0.0, 1.0):
                with lock:
                    if isinstance(piece, int):
                        tokens.append(piece)
                    elif piece and not seen_text:
                        seen_text = True
                        first_at.append(time.perf_counter())

        threads = [threading.Thread(target=one) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=RUN_TIMEOUT_S)
        return Run(time.perf_counter() - started, [at - started for at in first_at], sum(tokens))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- measuring


def summarize(runs: list[Run]) -> dict[str, Any]:
    best = max(runs, key=lambda run: run.tokens_per_s)
    return {
        "tokens_per_s": best.tokens_per_s,
        "tokens_per_s_by_run": [run.tokens_per_s for run in runs],
        "ttft_p50_s": percentile(best.ttfts_s, 0.5),
        "ttft_p95_s": percentile(best.ttfts_s, 0.95),
        "tokens": best.tokens,
        "seconds": best.seconds,
    }


def measure_levels(
    ways: dict[str, Any], levels: list[int], runs: int, measured_before: dict[int, dict[str, Any]] | None = None
) -> dict[int, dict[str, dict[str, Any]]]:
    """Each level's numbers per way (best of `runs`, after one warm-up run of each way), then closes the ways. The
    ways take turns (round-robin), so that load from other processes on a shared machine spreads over them all.
    `measured_before`: a way's numbers per level taken earlier (the toolkit's), reported with the others."""
    results: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for way in ways.values():  # warm-up: lazy initialisation, allocator caches
            way.run(min(levels))
        for clients in levels:
            by_way: dict[str, list[Run]] = {name: [] for name in ways}
            for _ in range(runs):
                for name, way in ways.items():
                    by_way[name].append(way.run(clients))
            results[clients] = {name: summarize(way_runs) for name, way_runs in by_way.items()}
            if measured_before and clients in measured_before:
                results[clients]["toolkit"] = measured_before[clients]
            print(
                f"{clients:>3} requests: "
                + ", ".join(f"{name} {numbers['tokens_per_s']:.1f}" for name, numbers in results[clients].items())
                + " tokens/s",
                flush=True,
            )
    finally:
        for way in ways.values():
            way.close()
    return results


def main() -> None:
    args = parse_arguments()
    levels = [int(text) for text in args.levels.split(",")]
    print(f"building the {args.size} model ...", flush=True)
    models = build_models(args.size)
    print(f"built in {models.build_s:.1f} s", flush=True)
    toolkit_results: dict[int, dict[str, Any]] = {}
    if not args.no_toolkit:  # first, on the unmerged model
        toolkit = ToolkitWay(models, args)
        toolkit.run(min(levels))  # warm-up
        toolkit_results = {clients: summarize([toolkit.run(clients)]) for clients in levels}
    models.merge()
    print("starting the engine ...", flush=True)
    ways: dict[str, Any] = {"engine": EngineWay(models, args), "generate": GenerateWay(models, args)}
    engine: EngineWay = ways["engine"]
    engine_facts = engine.engine.describe()
    print(f"engine ready in {engine.start_s:.1f} s: {engine_facts['summary']}", flush=True)

    results = measure_levels(ways, levels, args.runs, toolkit_results)

    rows = []
    for clients, by_way in results.items():
        for name, numbers in by_way.items():
            rows.append(
                [
                    clients,
                    name,
                    numbers["tokens_per_s"],
                    numbers["ttft_p50_s"],
                    numbers["ttft_p95_s"],
                    numbers["tokens"],
                    ratio(numbers["tokens_per_s"], by_way["generate"]["tokens_per_s"]),
                ]
            )
    facts = machine_facts()
    print()
    print(
        f"Model: random-weight Phi-3 family, size {args.size}, {models.device}, {models.model.dtype}; "
        f"greedy, {args.new_tokens} new tokens per request (toolkit: {args.toolkit_new_tokens}); "
        f"best of {args.runs} runs (toolkit: 1)"
    )
    print(f"Machine: {describe_machine(facts)}")
    print(
        f"Model built in {models.build_s:.1f} s; engine start (KV cache, CUDA graphs, warm-up) "
        f"{engine.start_s:.1f} s: {engine_facts['summary']}"
    )
    print()
    print(
        format_table(
            ["requests", "way", "tokens/s", "TTFT p50 s", "TTFT p95 s", "tokens", "tokens/s vs generate"], rows
        )
    )
    if 64 in results:
        target = ratio(results[64]["engine"]["tokens_per_s"], results[64]["generate"]["tokens_per_s"])
        print(f"\n64 requests: engine / generate tokens/s = {target:.2f} (CPU target on --size tiny: >= 0.8)")
    path = write_results(
        __file__,
        {
            "size": args.size,
            "device": models.device,
            "new_tokens": args.new_tokens,
            "toolkit_new_tokens": args.toolkit_new_tokens,
            "runs": args.runs,
            "model_build_s": models.build_s,
            "engine_start_s": engine.start_s,
            "engine": engine_facts,
            "levels": results,
        },
        path=args.json,
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
