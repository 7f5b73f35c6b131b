"""What serving the base model beside the adapter costs: the engine's tokens/s at 1, 8 and 64 concurrent requests,
greedy, the same prompt, three ways:

- `merged alone`: the adapter merged into the weights and nothing else served (the engine before several models);
- `adapter, base served too`: the app as it serves now (inference_app.engine.row_adapters: the adapter merged, the
  base a per-row correction), every request asking for the adapter;
- `base + adapter mixed`: the same server, half the requests asking for the base model, so that every decode step
  computes the corrections.

Targets: the second >= 0.95x the first, the third >= 0.7x the second. Ways run round-robin (best of --runs), so that
load from other processes on a shared machine spreads over all of them.

    python -m bench.adapters --size tiny                            # CPU
    python -m bench.adapters --size mini --json bench/adapters-mini.json   # a GPU
"""

from __future__ import annotations

import argparse
import copy

from bench.common import describe_machine, format_table, machine_facts, ratio, write_results
from bench.engine import EngineWay, add_engine_arguments, build_models, loaded_model, measure_levels

WAYS = ("merged alone", "adapter, base served too", "base + adapter mixed")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, levels="1,8,64")
    return parser.parse_args()


def main() -> None:
    from inference_app.engine.row_adapters import BASE_MODEL, serve_adapters

    args = parse_arguments()
    levels = [int(text) for text in args.levels.split(",")]
    models = build_models(args.size)
    # The app's path: the unmerged adapter (peft's "default") turned into row corrections, merged into the weights.
    served, row_models = serve_adapters(copy.deepcopy(models.model), ["default"], merge_first=True)
    both = loaded_model(served, models, ("base", "adapter"), row_models)
    models.merge()  # "merged alone": the engine before several models
    ways: dict[str, EngineWay] = {WAYS[0]: EngineWay(models, args)}
    ways[WAYS[1]] = EngineWay(models, args, both, request_models=(None,))
    ways[WAYS[2]] = EngineWay(models, args, both, request_models=(BASE_MODEL, None))
    print(f"engine: {ways[WAYS[1]].engine.describe()['summary']}", flush=True)

    results = measure_levels(ways, levels, args.runs)

    rows = []
    for clients, by_way in results.items():
        merged, single, mixed = (by_way[name]["tokens_per_s"] for name in WAYS)
        rows.append([clients, merged, single, mixed, ratio(single, merged), ratio(mixed, single)])
    facts = machine_facts()
    print(f"\nModel: random-weight Phi-3 family, size {args.size}, {models.device}, {models.model.dtype}; rank-64 LoRA")
    print(
        f"Machine: {describe_machine(facts)}; greedy, {args.new_tokens} new tokens per request, best of {args.runs}\n"
    )
    headers = ["requests", *(f"{name} tokens/s" for name in WAYS), "single / merged", "mixed / single"]
    print(format_table(headers, rows))
    path = write_results(__file__, {"size": args.size, "device": models.device, "levels": results}, path=args.json)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
