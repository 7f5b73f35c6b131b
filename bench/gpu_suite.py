"""Everything a GPU machine should measure, in one command and one JSON (bench/README.md):

1. the GPU tests (`pytest -m gpu tests/app/test_gpu.py`: CUDA-graph replays vs the eager step, a sliding-window
   model's rows past 2,047 tokens vs `generate`, float16 below compute capability 8.0);
2. the level table (`bench.engine --size mini --no-toolkit`: 1/8/32/64 identical requests, engine vs `generate`);
3. the mixed workload at 32 closed-loop clients and the stall scenario (`bench.mixed --size mini --scenario both`);
4. the 4-bit path's decode step against bf16 (`bench.mixed` at 1 client, --quantize-4bit), when bitsandbytes is
   installed.

Each part runs as its own process with a time limit, so one failing part leaves the others' numbers; the combined
JSON says what each part returned.

    python -m bench.gpu_suite --json bench/gpu-mini.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, write_results

PART_TIMEOUT_S = 300
# One client, equal prompts and replies: the time between tokens is the decode step at batch 1.
STEP_TIME_ARGS = ["--clients", "1", "--requests", "4", "--prompt-tokens", "256,256", "--reply-tokens", "128,128"]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mini", choices=("tiny", "small", "mini"), help="bench model shape")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default bench/gpu_suite.json)")
    return parser.parse_args()


def run_part(name: str, command: list[str], json_path: Path | None) -> dict[str, Any]:
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=PART_TIMEOUT_S)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as timeout:
        partial = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else timeout.stdout
        returncode, output = None, f"timed out after {PART_TIMEOUT_S} s: {partial or ''}"
    print(output[-4000:], flush=True)
    part: dict[str, Any] = {
        "command": " ".join(command),
        "returncode": returncode,
        "seconds": time.perf_counter() - started,
        "output_tail": output[-3000:],
    }
    if json_path is not None and json_path.exists():
        part["results"] = json.loads(json_path.read_text())
    return part


def main() -> None:
    args = parse_arguments()
    python = sys.executable
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        parts["gpu_tests"] = run_part(
            "GPU tests", [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/app/test_gpu.py"], None
        )
        engine_json = out / "engine.json"
        parts["levels"] = run_part(
            "level table",
            [python, "-m", "bench.engine", "--size", args.size, "--no-toolkit", "--json", str(engine_json)],
            engine_json,
        )
        mixed_json = out / "mixed.json"
        mixed = [python, "-m", "bench.mixed", "--size", args.size, "--scenario", "both", "--clients", "32"]
        parts["mixed"] = run_part(
            "mixed workload", [*mixed, "--requests", "128", "--json", str(mixed_json)], mixed_json
        )
        if importlib.util.find_spec("bitsandbytes") is None:
            parts["four_bit"] = {"skipped": "bitsandbytes is not installed"}
        else:
            for name, extra in (("step_bf16", []), ("step_4bit", ["--quantize-4bit"])):
                step_json = out / f"{name}.json"
                step = [python, "-m", "bench.mixed", "--size", args.size, *STEP_TIME_ARGS, *extra]
                parts[name] = run_part(name, [*step, "--json", str(step_json)], step_json)
    path = write_results(__file__, {"size": args.size, "parts": parts}, path=args.json)
    print("\n" + "\n".join(f"{name}: returncode {part.get('returncode')}" for name, part in parts.items()))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
