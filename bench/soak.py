"""Soak: N clients x M requests against the app on 127.0.0.1, mixing streaming, non-streaming, cancelled and
invalid requests, bounded in count and time.

Each client draws its requests from a seeded random mix (sampling settings, stop strings and lengths vary too).
Every invalid request must get a 4xx (not 429) with an OpenAI-style error body; everything else must succeed.
Afterwards as many concurrent requests as the app has generation slots must all succeed (cancelled requests gave
their slots back). Resident memory of the server is sampled after /ready, after a warm-up round, during the soak
and at the end.

    python -m bench.soak
    python -m bench.soak --clients 8 --requests 40 --max-seconds 300
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from bench.common import (
    BENCH_MESSAGES,
    add_model_arguments,
    app_arguments,
    describe_machine,
    format_table,
    machine_facts,
    percentile,
    prepare_model,
    stream_chat,
    write_results,
)
from tests.server_process import app_command, free_port, server_process

KINDS = {"streaming": 0.35, "non-streaming": 0.30, "cancelled": 0.15, "invalid": 0.20}
LONG_TEXT = "hello " * 6000  # more tokens than a Phi-3 context holds

# name -> request body (bytes: sent as is, with a JSON content type)
INVALID_REQUESTS: dict[str, Any] = {
    "no messages": {"model": "bench", "messages": []},
    "unknown role": {"model": "bench", "messages": [{"role": "robot", "content": "hi"}]},
    "messages not a list": {"model": "bench", "messages": "hi"},
    "negative max_tokens": {"model": "bench", "messages": BENCH_MESSAGES, "max_tokens": -5},
    "temperature out of range": {"model": "bench", "messages": BENCH_MESSAGES, "temperature": 7},
    "bad JSON": b'{"model": "bench", "messages": [',
    "prompt longer than the context": {"model": "bench", "messages": [{"role": "user", "content": LONG_TEXT}]},
}


@dataclass
class Outcome:
    kind: str
    detail: str  # the invalid request's name, or the sampling settings
    status: int
    latency_s: float
    unexpected: str | None  # why the outcome is wrong; None when it is what the API promises


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=60, help="requests per client")
    parser.add_argument("--warm-up-requests", type=int, default=3, help="requests per client before the soak")
    parser.add_argument("--max-seconds", type=float, default=240, help="no new requests after this long")
    parser.add_argument("--max-concurrent-generations", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


def generation_body(rng: random.Random, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "bench",
        "messages": BENCH_MESSAGES,
        "max_tokens": rng.randint(4, 24),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "top_p": rng.choice([1.0, 0.9]),
        "seed": rng.randint(0, 1000),
        "stream": stream,
    }
    if rng.random() < 0.3:
        body["stop"] = rng.choice([" w1", ["w2", "w3"]])
    return body


async def one_request(client: httpx.AsyncClient, base_url: str, rng: random.Random) -> Outcome:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    started = time.perf_counter()
    if kind == "invalid":
        name = rng.choice(list(INVALID_REQUESTS))
        return await invalid_request(client, base_url, name, started)
    if kind in ("streaming", "cancelled"):
        body = generation_body(rng, stream=True)
        result = await stream_chat(client, base_url, body, stop_after_first_text=kind == "cancelled")
        return Outcome(kind, _describe(body), result.status, result.latency_s, None if result.ok else result.error)
    body = generation_body(rng, stream=False)
    try:
        response = await client.post(base_url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        return Outcome(kind, _describe(body), 0, time.perf_counter() - started, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - started
    return Outcome(kind, _describe(body), response.status_code, latency, _check_completion(response))


def _describe(body: dict[str, Any]) -> str:
    return f"max_tokens={body['max_tokens']} temperature={body['temperature']} stop={body.get('stop')}"


def _check_completion(response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        completion = response.json()
        choice = completion["choices"][0]
        if not isinstance(choice["message"]["content"], str) or choice["finish_reason"] not in ("stop", "length"):
            return f"malformed completion: {response.text[:200]}"
        if completion["usage"]["completion_tokens"] < 0:
            return f"malformed usage: {completion['usage']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"malformed completion: {response.text[:200]}"
    return None


async def invalid_request(client: httpx.AsyncClient, base_url: str, name: str, started: float) -> Outcome:
    body = INVALID_REQUESTS[name]
    try:
        if isinstance(body, bytes):
            response = await client.post(
                base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await client.post(base_url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        return Outcome("invalid", name, 0, time.perf_counter() - started, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - started
    status = response.status_code
    if not 400 <= status < 500 or status == 429:
        return Outcome("invalid", name, status, latency, f"expected a 4xx, got {status}: {response.text[:200]}")
    try:
        error_body = response.json()["error"]
        if not isinstance(error_body["message"], str) or "type" not in error_body:
            raise KeyError("message")
    except (ValueError, KeyError, TypeError):
        return Outcome("invalid", name, status, latency, f"not an OpenAI-style error body: {response.text[:200]}")
    return Outcome("invalid", name, status, latency, None)


async def run_clients(base_url: str, clients: int, requests: int, deadline: float, seed: int) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient, rng: random.Random) -> None:
        for _ in range(requests):
            if time.perf_counter() > deadline:
                return
            outcomes.append(await one_request(client, base_url, rng))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 1)) as client:
        await asyncio.gather(*(client_loop(client, random.Random(seed * 1000 + index)) for index in range(clients)))
    return outcomes


async def slots_check(base_url: str, slots: int) -> list[str]:
    """`slots` concurrent requests: all must succeed (no 429), i.e. no slot leaked during the soak."""
    body = {"model": "bench", "messages": BENCH_MESSAGES, "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=slots + 1)) as client:
        responses = await asyncio.gather(
            *(client.post(base_url + "/v1/chat/completions", json=body) for _ in range(slots)), return_exceptions=True
        )
    problems = []
    for response in responses:
        if isinstance(response, BaseException):
            problems.append(f"{type(response).__name__}: {response}")
        elif response.status_code != 200:
            problems.append(f"status {response.status_code}: {response.text[:200]}")
    return problems


async def sample_memory(process: psutil.Process, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(process.memory_info().rss)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


async def soak(base_url: str, process: psutil.Process, args: argparse.Namespace) -> dict[str, Any]:
    mib = 2**20
    memory = {"after_ready_mib": process.memory_info().rss / mib}
    deadline = time.perf_counter() + args.max_seconds
    await run_clients(base_url, args.clients, args.warm_up_requests, deadline, seed=args.seed + 1)
    await asyncio.sleep(1)  # let cancelled generations finish
    memory["after_warm_up_mib"] = process.memory_info().rss / mib
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(process, samples, stop))
    started = time.perf_counter()
    outcomes = await run_clients(base_url, args.clients, args.requests, deadline, seed=args.seed)
    wall = time.perf_counter() - started
    stop.set()
    await sampler
    await asyncio.sleep(1)
    memory["end_mib"] = process.memory_info().rss / mib
    memory["max_during_soak_mib"] = max(samples, default=0) / mib
    slot_problems = await slots_check(base_url, args.max_concurrent_generations)
    async with httpx.AsyncClient(timeout=10) as client:
        ready_after = (await client.get(base_url + "/ready")).status_code
    return {
        "wall_s": wall,
        "planned_requests": args.clients * args.requests,
        "outcomes": outcomes,
        "memory": memory,
        "slot_check_problems": slot_problems,
        "ready_status_after": ready_after,
    }


def main() -> None:
    args = parse_arguments()
    model = prepare_model(args)
    port = free_port()
    command = app_command(
        port, [*app_arguments(model, args), "--max-concurrent-generations", str(args.max_concurrent_generations)]
    )
    print(f"starting the app; then {args.clients} clients x {args.requests} requests ...", flush=True)
    with server_process(command, port) as server:
        result = asyncio.run(soak(server.url, psutil.Process(server.process.pid), args))

    outcomes: list[Outcome] = result["outcomes"]
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    rows = []
    for kind in KINDS:
        kind_outcomes = by_kind.get(kind, [])
        latencies = [outcome.latency_s for outcome in kind_outcomes]
        statuses = sorted({outcome.status for outcome in kind_outcomes})
        rows.append(
            [
                kind,
                len(kind_outcomes),
                ",".join(map(str, statuses)),
                sum(outcome.unexpected is None for outcome in kind_outcomes),
                sum(outcome.unexpected is not None for outcome in kind_outcomes),
                percentile(latencies, 0.5),
                percentile(latencies, 0.95),
            ]
        )
    unexpected = [outcome for outcome in outcomes if outcome.unexpected is not None]
    invalid_statuses = {
        name: sorted({outcome.status for outcome in by_kind["invalid"] if outcome.detail == name})
        for name in INVALID_REQUESTS
    }
    memory = result["memory"]
    memory["end_over_after_warm_up"] = memory["end_mib"] / memory["after_warm_up_mib"]

    facts = machine_facts()
    print()
    print(
        f"Model: {model.description}; {args.clients} clients x {args.requests} requests "
        f"({len(outcomes)} sent in {result['wall_s']:.1f} s), seed {args.seed}"
    )
    print(f"Machine: {describe_machine(facts)}")
    print()
    print(
        format_table(
            ["kind", "requests", "statuses", "as expected", "unexpected", "latency p50 s", "latency p95 s"], rows
        )
    )
    print()
    print(
        format_table(
            ["invalid request", "status"],
            [[name, ",".join(map(str, statuses)) or "-"] for name, statuses in invalid_statuses.items()],
        )
    )
    print()
    print(
        format_table(
            ["server RSS MiB: after /ready", "after warm-up", "max during soak", "end", "end / after warm-up"],
            [
                [
                    memory["after_ready_mib"],
                    memory["after_warm_up_mib"],
                    memory["max_during_soak_mib"],
                    memory["end_mib"],
                    memory["end_over_after_warm_up"],
                ]
            ],
        )
    )
    print()
    print(f"unexpected errors: {len(unexpected)} (target 0)")
    for outcome in unexpected[:10]:
        print(f"  {outcome.kind} ({outcome.detail}): {outcome.unexpected}")
    print(
        f"after the soak: {args.max_concurrent_generations} concurrent requests -> "
        f"{len(result['slot_check_problems'])} failed; /ready {result['ready_status_after']}"
    )
    print(f"memory at the end: {memory['end_over_after_warm_up']:.3f}x after warm-up (target within 1.10x)")
    path = write_results(
        __file__,
        {
            "model": model.description,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "seed": args.seed,
            "max_seconds": args.max_seconds,
            "wall_s": result["wall_s"],
            "requests_sent": len(outcomes),
            "by_kind": {
                row[0]: dict(
                    zip(
                        ["requests", "statuses", "as_expected", "unexpected", "latency_p50_s", "latency_p95_s"],
                        row[1:],
                        strict=False,
                    )
                )
                for row in rows
            },
            "invalid_statuses": invalid_statuses,
            "unexpected": unexpected,
            "memory": memory,
            "slot_check_problems": result["slot_check_problems"],
            "ready_status_after": result["ready_status_after"],
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
