"""Cold start: seconds from process start to /ready 200, and where they go.

Two measurements per loading mode (safetensors memory-mapped, and mmap off = one sequential read, the app's
default), each --repeats times with the model's files evicted from the page cache first (as after a fresh mount):
- the real server, `python -m inference_app`: process start -> /health 200 -> /ready 200;
- the same steps one after another in a fresh interpreter (this script with --phases-child), to split the time
  into imports, app setup (ModelService + build_app), weight loading (tokenizer + weights), adapter, merge and
  first-token warm-up (the service's own timings). The server overlaps loading with its web imports, so its
  total can be lower than the sum of the phases.

    python -m bench.cold_start
    python -m bench.cold_start --model M --adapter A --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    BenchModel,
    add_model_arguments,
    app_arguments,
    describe_machine,
    format_table,
    machine_facts,
    median,
    prepare_model,
    write_results,
)
from tests.server_process import app_command, free_port, start_server, stop_server, wait_for_status

LOADING_MODES = {"mmap off (sequential read)": ["--no-load-with-mmap"], "mmap on": ["--load-with-mmap"]}
PHASES = ("imports", "app setup", "weights", "adapter", "merge", "warm-up", "total")
_PHASES_MARK = "PHASES "


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=600, help="bound on each start")
    parser.add_argument("--phases-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)  # the parent's time.time() at spawn
    parser.add_argument("--app-arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args()


def evict_from_page_cache(model: BenchModel) -> None:
    """Drops the model's and adapter's files from the page cache, so loading reads the disk again."""
    for folder in (model.model_path, model.adapter_path):
        for path in folder.rglob("*"):
            if path.is_file():
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(descriptor)
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(descriptor)


def phases_child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: the server's start-up steps one after another, timed."""
    started_at = args.started_at
    import peft  # noqa: F401  (the heavy imports, timed)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from inference_app.server import build_app
    from inference_app.service import ModelService
    from inference_app.settings import parse_settings

    imported_at = time.time()
    settings = parse_settings(args.app_arguments, environ={})
    service = ModelService(settings)
    build_app(settings, service)
    set_up_at = time.time()
    service.start_loading()
    status = service.wait_until_loaded(timeout=args.timeout_s)
    loaded_at = time.time()
    if status != "ready":
        sys.exit(f"loading failed: {service.failure_reason}")
    timings = service.load_timings
    phases = {
        "imports": imported_at - started_at,
        "app setup": set_up_at - imported_at,
        "weights": timings.get("weights"),
        "adapter": timings.get("adapter"),
        "merge": timings.get("merge"),
        "KV cache + CUDA graphs": timings.get("kv_cache_and_graphs"),
        "warm-up": timings.get("warmup"),
        "loading other": loaded_at - set_up_at - sum(timings.values()),
        "total": loaded_at - started_at,
    }
    print(_PHASES_MARK + json.dumps(phases), flush=True)
    service.close()


def run_phases_child(arguments: list[str], timeout_s: float) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "bench.cold_start",
        "--phases-child",
        "--timeout-s",
        str(timeout_s),
        "--started-at",
        str(time.time()),
        "--app-arguments",
        *arguments,
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(_PHASES_MARK):
            return json.loads(line.removeprefix(_PHASES_MARK))
    raise RuntimeError(f"phase measurement failed ({completed.returncode}):\n{completed.stderr[-3000:]}")


def run_server_start(arguments: list[str], timeout_s: float) -> dict[str, float]:
    port = free_port()
    server = start_server(app_command(port, arguments), port)
    try:
        to_health = wait_for_status(server, "/health", timeout_s)
        to_ready = wait_for_status(server, "/ready", timeout_s)
    finally:
        stop_server(server)
    return {"to_health_s": to_health, "to_ready_s": to_ready}


def main() -> None:
    args = parse_arguments()
    if args.phases_child:
        phases_child(args)
        return
    model = prepare_model(args)
    results: dict[str, dict[str, Any]] = {}
    for mode, mode_arguments in LOADING_MODES.items():
        arguments = [*app_arguments(model, args), *mode_arguments]
        phases_runs, server_runs = [], []
        for repeat in range(args.repeats):
            print(f"{mode}: run {repeat + 1}/{args.repeats} ...", flush=True)
            evict_from_page_cache(model)
            phases_runs.append(run_phases_child(arguments, args.timeout_s))
            evict_from_page_cache(model)
            server_runs.append(run_server_start(arguments, args.timeout_s))
        results[mode] = {
            "phases_median_s": {
                phase: median([run[phase] for run in phases_runs if run.get(phase) is not None])
                for phase in phases_runs[0]
            },
            "server_median_s": {key: median([run[key] for run in server_runs]) for key in server_runs[0]},
            "phases_runs": phases_runs,
            "server_runs": server_runs,
        }

    facts = machine_facts()
    weight_bytes = sum(path.stat().st_size for path in Path(model.model_path).glob("*.safetensors"))
    print()
    print(
        f"Model: {model.description} ({weight_bytes / 2**20:.0f} MiB of safetensors); page cache evicted before "
        f"each start; median of {args.repeats}"
    )
    print(f"Machine: {describe_machine(facts)}")
    print()
    phase_rows = [
        [
            mode,
            *(result["phases_median_s"].get(phase) for phase in PHASES),
            (result["phases_median_s"]["imports"] or 0) + (result["phases_median_s"]["app setup"] or 0),
        ]
        for mode, result in results.items()
    ]
    print("Phases, one after another in a fresh interpreter (seconds):")
    print(format_table(["loading", *PHASES, "imports + setup"], phase_rows))
    print()
    print("The real server, `python -m inference_app` (seconds from process start):")
    print(
        format_table(
            ["loading", "/health 200", "/ready 200"],
            [
                [mode, result["server_median_s"]["to_health_s"], result["server_median_s"]["to_ready_s"]]
                for mode, result in results.items()
            ],
        )
    )
    path = write_results(
        __file__,
        {
            "model": model.description,
            "weights_bytes": weight_bytes,
            "repeats": args.repeats,
            "dtype": args.dtype,
            "page_cache": "evicted before each start (posix_fadvise DONTNEED)",
            "modes": results,
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
