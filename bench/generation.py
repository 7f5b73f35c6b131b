"""Single-stream generation speed: tokens/s and time to first token, in process (no HTTP).

For the merged adapter, the unmerged adapter and the base model alone, it measures
- a bare `model.generate` loop (greedy, KV cache, on the model `load_model` returns), and
- the app's own path, `ModelService.stream_chat` (the batching engine with one request in flight),
each as the median of --repeats runs after one warm-up round. All six are loaded at once and run round-robin.

    python -m bench.generation                  # default bench model (Phi-3 shape scaled to a 2-core CPU)
    python -m bench.generation --size mini      # the real Phi-3-mini shape (GPU; bf16 with --dtype auto)
    python -m bench.generation --model M --adapter A
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from dataclasses import dataclass, replace
from typing import Any

from bench.common import (
    BENCH_MESSAGES,
    BenchModel,
    add_model_arguments,
    describe_machine,
    format_table,
    machine_facts,
    median,
    prepare_model,
    ratio,
    write_results,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "merged adapter": {"merge_adapter": True},
    "unmerged adapter": {"merge_adapter": False},
    "base only": {"base_only": True},
}


@dataclass
class Run:
    seconds: float  # start -> last token
    ttft_s: float  # start -> first new token
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    return parser.parse_args()


def settings_for(model: BenchModel, args: argparse.Namespace, variant: str) -> Any:
    from inference_app.settings import AdapterOption, Settings

    base = Settings(model_path=model.model_path, adapters=(AdapterOption(None, model.adapter_path),), dtype=args.dtype)
    return replace(base, **VARIANTS[variant])


class BareGenerate:
    """`model.generate` as a script would call it, timing the first token with a streamer."""

    def __init__(self, settings: Any, args: argparse.Namespace) -> None:
        from inference_app.engine.model_loading import load_model

        self.loaded = load_model(settings)
        encoded: Any = self.loaded.tokenizer.apply_chat_template(
            BENCH_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        self.inputs = encoded.to(self.loaded.device)
        self.max_new_tokens = args.max_new_tokens

    def run(self) -> Run:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class FirstTokenTimer(BaseStreamer):
            def __init__(self) -> None:
                self.calls = 0
                self.first_token_at: float | None = None

            def put(self, value: Any) -> None:
                value.tolist()  # waits for the device, so the time is when the token exists
                self.calls += 1
                if self.calls == 2:  # the first call hands over the prompt
                    self.first_token_at = time.perf_counter()

            def end(self) -> None:
                pass

        timer = FirstTokenTimer()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.loaded.model.generate(
                **self.inputs, max_new_tokens=self.max_new_tokens, do_sample=False, streamer=timer
            )
        seconds = time.perf_counter() - started
        assert timer.first_token_at is not None
        return Run(seconds, timer.first_token_at - started, int(output.shape[1] - self.inputs["input_ids"].shape[1]))

    def close(self) -> None:
        del self.loaded


class ServiceGenerate:
    """The app's generation path: ModelService.stream_chat, greedy, one request at a time."""

    def __init__(self, settings: Any, args: argparse.Namespace) -> None:
        from inference_app.service import ModelService, SamplingParams

        self.service = ModelService(settings)
        self.service.start_loading()
        if self.service.wait_until_loaded(timeout=1800) != "ready":
            raise RuntimeError(f"model did not load: {self.service.failure_reason}")
        self.params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)

    def run(self) -> Run:
        return asyncio.run(self._run())

    async def _run(self) -> Run:
        started = time.perf_counter()
        first_text_at = None
        tokens = 0
        async for chunk in self.service.stream_chat(BENCH_MESSAGES, self.params, wait=True):
            if chunk.text and first_text_at is None:
                first_text_at = time.perf_counter()
            tokens = chunk.completion_tokens
        seconds = time.perf_counter() - started
        return Run(seconds, (first_text_at or time.perf_counter()) - started, tokens)

    def close(self) -> None:
        self.service.close()


MODES: dict[str, type[BareGenerate | ServiceGenerate]] = {
    "bare_generate": BareGenerate,
    "model_service": ServiceGenerate,
}


def measure_interleaved(model: BenchModel, args: argparse.Namespace) -> dict[str, dict[str, list[Run]]]:
    """Loads every variant in every mode, then runs them round-robin, so that load from other processes on a
    shared machine spreads over all of them instead of skewing one."""
    runners: dict[tuple[str, str], BareGenerate | ServiceGenerate] = {}
    for variant in VARIANTS:
        for mode, runner_class in MODES.items():
            print(f"loading {variant} for {mode} ...", flush=True)
            runners[variant, mode] = runner_class(settings_for(model, args, variant), args)
    runs: dict[str, dict[str, list[Run]]] = {variant: {mode: [] for mode in MODES} for variant in VARIANTS}
    try:
        for repeat in range(args.repeats + 1):
            for (variant, mode), runner in runners.items():
                run = runner.run()
                if repeat > 0:  # the first round warms up
                    runs[variant][mode].append(run)
    finally:
        for runner in runners.values():
            runner.close()
        gc.collect()
    return runs


def summarize(runs: list[Run]) -> dict[str, Any]:
    return {
        "tokens_per_s": median([run.tokens_per_s for run in runs]),
        "ttft_s": median([run.ttft_s for run in runs]),
        "tokens": median([run.tokens for run in runs]),
        "runs": runs,
    }


def main() -> None:
    args = parse_arguments()
    model = prepare_model(args)
    runs = measure_interleaved(model, args)
    results = {
        variant: {mode: summarize(mode_runs) for mode, mode_runs in variant_runs.items()}
        for variant, variant_runs in runs.items()
    }

    rows = []
    for variant, result in results.items():
        bare, service = result["bare_generate"], result["model_service"]
        rows.append(
            [
                variant,
                bare["tokens_per_s"],
                bare["ttft_s"],
                service["tokens_per_s"],
                service["ttft_s"],
                ratio(service["tokens_per_s"], bare["tokens_per_s"]),
                f"{bare['tokens']:.0f}/{service['tokens']:.0f}",
            ]
        )
    merged, unmerged = results["merged adapter"], results["unmerged adapter"]
    targets = {
        "merged_over_unmerged_service": ratio(
            merged["model_service"]["tokens_per_s"], unmerged["model_service"]["tokens_per_s"]
        ),
        "merged_over_unmerged_bare": ratio(
            merged["bare_generate"]["tokens_per_s"], unmerged["bare_generate"]["tokens_per_s"]
        ),
        "service_over_bare_merged": ratio(
            merged["model_service"]["tokens_per_s"], merged["bare_generate"]["tokens_per_s"]
        ),
    }
    facts = machine_facts()
    print()
    print(f"Model: {model.description}; {args.max_new_tokens} new tokens, greedy, median of {args.repeats} runs")
    print(f"Machine: {describe_machine(facts)}")
    print()
    print(
        format_table(
            [
                "variant",
                "bare generate tok/s",
                "bare TTFT s",
                "ModelService tok/s",
                "ModelService TTFT s",
                "service/bare",
                "tokens bare/service",
            ],
            rows,
        )
    )
    print()
    print(
        f"merged / unmerged tokens/s: ModelService {targets['merged_over_unmerged_service']:.2f}x, "
        f"bare generate {targets['merged_over_unmerged_bare']:.2f}x (target >= 1.2x)"
    )
    print(f"ModelService / bare generate (merged): {targets['service_over_bare_merged']:.2f} (target >= 0.90)")
    path = write_results(
        __file__,
        {
            "model": model.description,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "dtype": args.dtype,
            "variants": results,
            "targets": targets,
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
