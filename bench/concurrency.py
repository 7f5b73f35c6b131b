"""Concurrent clients over the HTTP API: the app against the AI Toolkit-style baseline, in one run.

Both servers run the same model on 127.0.0.1 (the app: merged adapter, batched generation; the baseline:
bench/toolkit_baseline.py, unmerged adapter, a `model.generate` thread per request). For 1, 4, 8 and 16 clients,
each client sends --requests streaming chat completions one after another (greedy, --max-tokens each). Levels
alternate between the two servers, and the sweep repeats --rounds times, so that load from other processes on a
shared machine hits both alike. Reported per level and server, pooled over the rounds: aggregate completion
tokens/s (all tokens / wall time), p50/p95 latency and time to first token, failed requests; then the
app/baseline ratios.

    python -m bench.concurrency
    python -m bench.concurrency --size mini              # on a GPU
    python -m bench.concurrency --clients 1,8 --requests 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import (
    RequestResult,
    add_model_arguments,
    app_arguments,
    baseline_command,
    chat_payload,
    describe_machine,
    format_table,
    machine_facts,
    percentile,
    prepare_model,
    ratio,
    stream_chat,
    write_results,
)
from tests.server_process import app_command, free_port, server_process

SERVERS = ("app", "toolkit baseline")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="sweeps over all levels (pooled), so that noise on a shared machine averages out",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument(
        "--level-timeout-s", type=float, default=300, help="no new requests after this long in one level"
    )
    return parser.parse_args()


@dataclass
class LevelRun:
    results: list[RequestResult]
    wall_s: float


async def run_level(base_url: str, clients: int, args: argparse.Namespace) -> LevelRun:
    """`clients` concurrent clients, each sending its requests one after another; bounded in count and time."""
    payload = chat_payload(args.max_tokens, stream=True)
    deadline = time.perf_counter() + args.level_timeout_s
    results: list[RequestResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(args.requests):
            if time.perf_counter() > deadline:
                return
            results.append(await stream_chat(client, base_url, payload))

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.level_timeout_s), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return LevelRun(results, wall)


def summarize(runs: list[LevelRun], planned: int) -> dict[str, Any]:
    """Pools the rounds of one level on one server: all tokens over all wall time, percentiles of all requests."""
    results = [result for run in runs for result in run.results]
    wall_s = sum(run.wall_s for run in runs)
    ok = [result for result in results if result.ok]
    latencies = [result.latency_s for result in ok]
    ttfts = [result.ttft_s for result in ok if result.ttft_s is not None]
    failures = [f"{result.status}: {result.error}" for result in results if not result.ok]
    return {
        "planned_requests": planned,
        "ok_requests": len(ok),
        "failed_requests": len(failures),
        "failures": failures[:10],
        "wall_s": wall_s,
        "completion_tokens": sum(result.completion_tokens for result in ok),
        "tokens_per_s": sum(result.completion_tokens for result in ok) / wall_s,
        "tokens_per_s_by_round": [sum(r.completion_tokens for r in run.results if r.ok) / run.wall_s for run in runs],
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
    }


async def warm_up(base_url: str, args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        result = await stream_chat(client, base_url, chat_payload(args.max_tokens, stream=True))
    if not result.ok:
        raise RuntimeError(f"warm-up request to {base_url} failed: {result.status} {result.error}")


def main() -> None:
    args = parse_arguments()
    levels = [int(text) for text in args.clients.split(",")]
    model = prepare_model(args)
    arguments = app_arguments(model, args)
    ports = {server: free_port() for server in SERVERS}
    commands = {
        # Every client gets a generation slot: the API would answer 429 beyond the limit.
        "app": app_command(ports["app"], [*arguments, "--max-concurrent-generations", str(max(levels))]),
        "toolkit baseline": baseline_command(ports["toolkit baseline"], arguments),
    }
    runs: dict[int, dict[str, list[LevelRun]]] = {clients: {server: [] for server in SERVERS} for clients in levels}
    with ExitStack() as stack:
        base_urls = {}
        for server in SERVERS:
            print(f"starting {server} ...", flush=True)
            base_urls[server] = stack.enter_context(server_process(commands[server], ports[server])).url
            asyncio.run(warm_up(base_urls[server], args))
        for round_number in range(1, args.rounds + 1):
            for clients in levels:
                for server in SERVERS:
                    print(f"round {round_number}: {clients:>3} clients -> {server} ...", flush=True)
                    runs[clients][server].append(asyncio.run(run_level(base_urls[server], clients, args)))
    results = {
        clients: {
            server: summarize(server_runs, clients * args.requests * args.rounds)
            for server, server_runs in level.items()
        }
        for clients, level in runs.items()
    }

    rows = []
    for clients, level in results.items():
        for server in SERVERS:
            numbers = level[server]
            rows.append(
                [
                    clients,
                    server,
                    f"{numbers['ok_requests']}/{numbers['planned_requests']}",
                    numbers["tokens_per_s"],
                    numbers["latency_p50_s"],
                    numbers["latency_p95_s"],
                    numbers["ttft_p50_s"],
                    numbers["ttft_p95_s"],
                ]
            )
    ratio_rows = []
    ratios: dict[int, dict[str, float | None]] = {}
    for clients, level in results.items():
        app, baseline = level["app"], level["toolkit baseline"]
        ratios[clients] = {
            "tokens_per_s": ratio(app["tokens_per_s"], baseline["tokens_per_s"]),
            "ttft_p95": ratio(app["ttft_p95_s"], baseline["ttft_p95_s"]),
            "latency_p95": ratio(app["latency_p95_s"], baseline["latency_p95_s"]),
        }
        ratio_rows.append([clients, *ratios[clients].values()])

    facts = machine_facts()
    print()
    print(
        f"Model: {model.description}; {args.requests} streaming requests per client and level, "
        f"max_tokens {args.max_tokens}, greedy; {args.rounds} rounds pooled"
    )
    print(f"Machine: {describe_machine(facts)}")
    print()
    print(
        format_table(
            [
                "clients",
                "server",
                "ok/planned",
                "tokens/s",
                "latency p50 s",
                "latency p95 s",
                "TTFT p50 s",
                "TTFT p95 s",
            ],
            rows,
        )
    )
    print()
    print(
        format_table(
            ["clients", "tokens/s app/baseline", "TTFT p95 app/baseline", "latency p95 app/baseline"], ratio_rows
        )
    )
    if 8 in ratios:
        print(
            f"\n8 clients: tokens/s {ratios[8]['tokens_per_s']:.2f}x the baseline (target >= 3x); "
            f"p95 TTFT {ratios[8]['ttft_p95']:.2f}x the baseline's (target <= 1)"
        )
    path = write_results(
        __file__,
        {
            "model": model.description,
            "requests_per_client": args.requests,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "dtype": args.dtype,
            "levels": results,
            "ratios_app_over_baseline": ratios,
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
