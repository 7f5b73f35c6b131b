"""Pieces the bench scripts share: the model on disk, the toolkit baseline's command, streamed requests, tables and
JSON. Servers run through tests/server_process.py, which the tests use too."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_MODELS_DIR = Path(tempfile.gettempdir()) / "inference-app-bench-models"
# Every bench asks the same question, so numbers stay comparable between scripts and runs.
BENCH_MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
# The machine may be shared. The load average counts the bench's own threads too, so what tells whether other
# work disturbed a run is the CPU time everything else used meanwhile (busy time of all CPUs minus our own).
_LOAD_AT_START = os.getloadavg()
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat: everything but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the servers, once stopped)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


_CPU_AT_START = (time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds())


def other_processes_cpu_share() -> float:
    """Fraction of the machine's CPU capacity that other processes used since this script started."""
    started, busy, own = _CPU_AT_START
    elapsed = time.monotonic() - started
    others = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
    return max(0.0, others) / (elapsed * (os.cpu_count() or 1))


@dataclass(frozen=True)
class BenchModel:
    model_path: Path
    adapter_path: Path
    description: str  # for tables and JSON: the size built, or the paths given


# ---------------------------------------------------------------- the model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        default="small",
        choices=("tiny", "small", "mini"),
        help="random-weight Phi-3-family model to generate (small: Phi-3's shape scaled to a 2-core CPU; "
        "mini: the real Phi-3-mini shape, for a GPU); ignored with --model",
    )
    parser.add_argument("--model", type=Path, help="use this base model folder instead of a generated one")
    parser.add_argument("--adapter", type=Path, help="the LoRA adapter folder for --model")
    parser.add_argument(
        "--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="where generated models are built and kept"
    )
    parser.add_argument(
        "--dtype", default="auto", help="weights dtype passed to the app (auto: bf16 on CUDA, fp32 on CPU)"
    )


def prepare_model(args: argparse.Namespace) -> BenchModel:
    """The model and adapter to benchmark: the folders given, or a generated model (built once, then reused)."""
    if args.model is not None:
        if args.adapter is None:
            sys.exit("--model needs --adapter (the LoRA adapter trained on it)")
        return BenchModel(args.model, args.adapter, f"{args.model} + {args.adapter}")
    import torch

    from inference_app.demo.random_model import cached_model_folders

    started = time.perf_counter()
    # The real Phi-3-mini shape is built in bfloat16 (7.6 GB) as it ships; the small ones in float32.
    dtype = torch.bfloat16 if args.size == "mini" else torch.float32
    folders, built_now = cached_model_folders(args.models_dir / args.size, args.size, dtype)
    if built_now:
        print(
            f"built the {args.size} bench model in {folders.root} in {time.perf_counter() - started:.1f} s", flush=True
        )
    description = f"generated random-weight Phi-3 family, size {args.size}"
    return BenchModel(folders.model_path, folders.adapter_path, description)


def app_arguments(model: BenchModel, args: argparse.Namespace) -> list[str]:
    """Command-line options of `python -m inference_app` (and of the toolkit baseline) for this model."""
    return ["--model", str(model.model_path), "--adapter", str(model.adapter_path), "--dtype", args.dtype]


# ---------------------------------------------------------------- servers


# The servers run as processes of their own: tests/server_process.py (shared with the tests).


def baseline_command(port: int, arguments: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "bench.toolkit_baseline", "--host", "127.0.0.1", "--port", str(port), *arguments]


# ---------------------------------------------------------------- requests


@dataclass
class RequestResult:
    status: int  # HTTP status; 0 when the request failed without one (connection error, timeout)
    latency_s: float  # request sent -> last byte
    ttft_s: float | None  # request sent -> first chunk with text (streaming only)
    completion_tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def chat_payload(max_tokens: int, stream: bool, temperature: float = 0.0, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "bench",
        "messages": BENCH_MESSAGES,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
        **extra,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


async def stream_chat(
    client: httpx.AsyncClient, base_url: str, payload: dict[str, Any], stop_after_first_text: bool = False
) -> RequestResult:
    """One streaming chat completion, timed; `stop_after_first_text` hangs up after the first text (a cancel)."""
    import httpx

    started = time.perf_counter()
    ttft = None
    text_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", base_url + "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(response.status_code, time.perf_counter() - started, None, 0, response.text[:300])
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        text_chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - started
                if stop_after_first_text and ttft is not None:
                    break
            else:
                latency = time.perf_counter() - started
                return RequestResult(200, latency, ttft, text_chunks, "stream ended without [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestResult(0, time.perf_counter() - started, ttft, text_chunks, f"{type(error).__name__}: {error}")
    # Without a usage chunk each text chunk counts as one token (what a client would see).
    tokens = usage_tokens if usage_tokens is not None else text_chunks
    return RequestResult(200, time.perf_counter() - started, ttft, tokens)


# ---------------------------------------------------------------- numbers, tables, JSON


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into RESULTS.md)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[column]) for row in cells)) for column, header in enumerate(headers)]
    lines = [
        "| " + " | ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
    ]
    for cells_row, row in zip(cells, rows, strict=True):
        aligned = [
            cell.rjust(width) if isinstance(value, (int, float)) else cell.ljust(width)
            for cell, value, width in zip(cells_row, row, widths, strict=True)
        ]
        lines.append("| " + " | ".join(aligned) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def machine_facts() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{package: _version(package) for package in ("torch", "transformers", "peft", "gradio", "uvicorn")},
    }
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        facts["gpu"] = query.stdout.strip() or None
    return facts


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(facts: dict[str, Any]) -> str:
    gpu = f", GPU {facts['gpu']}" if facts.get("gpu") else ""
    load = "/".join(f"{value:.1f}" for value in (_LOAD_AT_START[0], os.getloadavg()[0]))
    return (
        f"{facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory_gb']} GB{gpu}; "
        f"python {facts['python']}, torch {facts['torch']}, transformers {facts['transformers']}, "
        f"peft {facts['peft']}; "
        f"1-min load average at start/end {load}; other processes used {other_processes_cpu_share():.0%} of the CPUs"
    )


def write_results(script: str, results: dict[str, Any], path: Path | None = None) -> Path:
    """Writes the results as JSON (default: next to the script, bench/<script>.json), with the command and the
    machine."""
    path = path or Path(script).resolve().with_suffix(".json")
    document = {
        "command": command_line(),
        "finished_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(),
        "load_average_1_5_15_min": {"at_start": _LOAD_AT_START, "at_end": os.getloadavg()},
        "other_processes_cpu_share": other_processes_cpu_share(),
        **results,
    }
    path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def command_line() -> str:
    """How this run was started, as a person would type it (`python -m bench.x ...`)."""
    module = Path(sys.argv[0]).stem
    return " ".join(["python -m bench." + module, *sys.argv[1:]])
