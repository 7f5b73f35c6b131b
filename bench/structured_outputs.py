"""The cost of structured outputs (issue 21): decode throughput with a json_schema against without, and the time to
first token of a schema the server has not seen (grammar compile) against one it has (cached).

One app server on 127.0.0.1. Throughput: --clients concurrent clients each send --requests streaming requests one
after another, greedy, --max-tokens each, alternately free text and with SCHEMA (a list of at least 40 short strings,
so that the constrained replies too run to max_tokens and both sides decode as many tokens);
--rounds rounds pooled. Time to first token: one request at a time, max_tokens 1; a fresh schema each time (a new
property name: the server must compile it), then the same schema again (cached), then no schema; and in process,
without HTTP, the milliseconds a new and a cached schema's matcher take.

    python -m bench.structured_outputs
    python -m bench.structured_outputs --size mini        # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx

from bench.common import (
    BenchModel,
    RequestResult,
    add_model_arguments,
    app_arguments,
    chat_payload,
    describe_machine,
    format_table,
    machine_facts,
    median,
    prepare_model,
    ratio,
    stream_chat,
    write_results,
)
from tests.server_process import app_command, free_port, server_process

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 40}},
    "required": ["notes"],
    "additionalProperties": False,
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the throughput runs")
    parser.add_argument("--requests", type=int, default=3, help="requests per client and run")
    parser.add_argument("--rounds", type=int, default=3, help="free/json_schema pairs of runs, pooled")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each throughput request")
    parser.add_argument("--schemas", type=int, default=5, help="new schemas (and cached repeats) timed")
    return parser.parse_args()


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}


def new_schema() -> dict[str, Any]:
    """A schema the server has not compiled: SCHEMA plus a property of a new name and a few typed fields."""
    properties = {
        **SCHEMA["properties"],
        f"id_{uuid.uuid4().hex[:8]}": {"type": "integer", "minimum": 0},
        "kind": {"enum": ["a", "b", "c"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "maxItems": 4},
    }
    return {**SCHEMA, "properties": properties, "required": list(properties)}


async def throughput(base_url: str, args: argparse.Namespace, constrained: bool) -> tuple[float, list[RequestResult]]:
    """(tokens/s over the run's wall time, the results) of --clients clients with or without the schema."""
    extra: dict[str, Any] = {"response_format": response_format(SCHEMA)} if constrained else {}
    payload = chat_payload(args.max_tokens, stream=True, **extra)
    results: list[RequestResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(args.requests):
            results.append(await stream_chat(client, base_url, payload))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.clients + 1)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
        wall = time.perf_counter() - started
    failed = [result for result in results if not result.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].status} {failed[0].error}")
    return sum(result.completion_tokens for result in results) / wall, results


async def first_token_s(base_url: str, extra: dict[str, Any]) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        result = await stream_chat(client, base_url, chat_payload(1, stream=True, **extra))
    if not result.ok or result.ttft_s is None:
        raise RuntimeError(f"request failed: {result.status} {result.error}")
    return result.ttft_s


async def time_to_first_token(base_url: str, schemas: int) -> dict[str, Any]:
    # The first grammar of a server also builds the tokenizer's grammar index (once per server).
    first_ever = await first_token_s(base_url, {"response_format": response_format(new_schema())})
    new, cached, free = [], [], []
    for _ in range(schemas):
        schema = new_schema()
        new.append(await first_token_s(base_url, {"response_format": response_format(schema)}))
        cached.append(await first_token_s(base_url, {"response_format": response_format(schema)}))
        free.append(await first_token_s(base_url, {}))
    return {
        "first_schema_of_the_server_s": first_ever,
        "new_schema_s": new,
        "cached_schema_s": cached,
        "no_schema_s": free,
    }


def compile_times_ms(model: BenchModel, schemas: int) -> dict[str, Any]:
    """In process, without HTTP noise: milliseconds to get a matcher for a new schema (compile) and for the same
    schema again (cached), with the model's tokenizer."""
    from transformers import AutoTokenizer

    from inference_app.api.structured_outputs import json_schema_grammar
    from inference_app.engine.grammar import Grammars

    tokenizer = AutoTokenizer.from_pretrained(model.model_path)
    grammars = Grammars(tokenizer, len(tokenizer), frozenset([tokenizer.eos_token_id]))

    def matcher_ms(grammar: str) -> float:
        started = time.perf_counter()
        grammars.matcher(grammar)
        return (time.perf_counter() - started) * 1000

    first = matcher_ms(json_schema_grammar(new_schema(), "bench"))  # also builds the tokenizer's index
    new, cached = [], []
    for _ in range(schemas):
        grammar = json_schema_grammar(new_schema(), "bench")
        new.append(matcher_ms(grammar))
        cached.append(matcher_ms(grammar))
    return {"first_schema_ms": first, "new_schema_ms": new, "cached_schema_ms": cached}


def main() -> None:
    args = parse_arguments()
    model = prepare_model(args)
    port = free_port()
    command = app_command(port, [*app_arguments(model, args), "--max-concurrent-generations", str(args.clients)])
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    completion_tokens: dict[str, int] = {"free": 0, "json_schema": 0}
    with server_process(command, port) as server:
        ttft = asyncio.run(time_to_first_token(server.url, args.schemas))
        asyncio.run(throughput(server.url, args, constrained=False))  # warm-up
        for round_number in range(1, args.rounds + 1):
            for kind in ("free", "json_schema"):
                print(f"round {round_number}: {args.clients} clients, {kind} ...", flush=True)
                rate, results = asyncio.run(throughput(server.url, args, constrained=kind == "json_schema"))
                rates[kind].append(rate)
                completion_tokens[kind] += sum(result.completion_tokens for result in results)
    compile_ms = compile_times_ms(model, args.schemas)
    facts = machine_facts()
    tokens_per_s = {kind: sum(values) / len(values) for kind, values in rates.items()}
    slowdown = ratio(tokens_per_s["json_schema"], tokens_per_s["free"])
    print()
    print(f"Model: {model.description}; {args.clients} clients x {args.requests} streaming requests, greedy, ")
    print(f"max_tokens {args.max_tokens}; {args.rounds} rounds each")
    print(f"Machine: {describe_machine(facts)}")
    print()
    print(
        format_table(
            ["requests", "tokens/s (mean of rounds)", "tokens/s by round", "completion tokens"],
            [
                [kind, tokens_per_s[kind], " ".join(f"{rate:.1f}" for rate in rates[kind]), completion_tokens[kind]]
                for kind in rates
            ],
        )
    )
    print(f"\njson_schema / free tokens/s: {slowdown:.2f}x (target >= 0.85x)")
    print()
    print(
        format_table(
            ["time to first token (max_tokens 1, one request at a time)", "median s", "all s"],
            [
                [name, median(values), " ".join(f"{value:.3f}" for value in values)]
                for name, values in (
                    ("new schema (compiled)", ttft["new_schema_s"]),
                    ("same schema again (cached)", ttft["cached_schema_s"]),
                    ("no schema", ttft["no_schema_s"]),
                )
            ],
        )
    )
    print(f"first schema of the server (also builds the token index): {ttft['first_schema_of_the_server_s']:.3f} s")
    new_ms, cached_ms = median(compile_ms["new_schema_ms"]), median(compile_ms["cached_schema_ms"])
    print(
        f"in process: a new schema's matcher {new_ms:.2f} ms (median), a cached one's {cached_ms:.3f} ms; "
        f"the first schema (also the token index) {compile_ms['first_schema_ms']:.0f} ms"
    )
    path = write_results(
        __file__,
        {
            "model": model.description,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "tokens_per_s_by_round": rates,
            "tokens_per_s": tokens_per_s,
            "json_schema_over_free": slowdown,
            "time_to_first_token": ttft,
            "matcher_ms": compile_ms,
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
