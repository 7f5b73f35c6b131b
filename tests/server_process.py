"""A server in a process of its own on 127.0.0.1, for the tests and the benchmarks alike: a free port, the process
with its output in a log file, bounded waits for an HTTP status, and a stop by Ctrl+C (SIGINT) as a user stops it."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 30


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:<port>, no trailing slash
    log_path: Path
    started_at: float  # time.perf_counter() just before the process was started
    owns_log: bool  # a temporary log, deleted when the server stops

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    """A port free now (released for the server to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def app_command(port: int, arguments: Sequence[str]) -> list[str]:
    """`python -m inference_app` on 127.0.0.1:`port`, as users and the container run it."""
    return [sys.executable, "-m", "inference_app", "--host", "127.0.0.1", "--port", str(port), *arguments]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls `condition` until it holds (a refused connection counts as not yet); TimeoutError after `timeout` s."""
    import httpx  # imported here: the in-process benches (bench/engine.py) run without the web client

    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def start_server(
    command: Sequence[str],
    port: int,
    log_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    max_open_files: int | None = None,
) -> ServerProcess:
    """Starts `command` (a server for 127.0.0.1:`port`) from the repository root, its output going to `log_path`
    (default: a temporary file), with `environ` added to this process's environment; with `max_open_files`, the
    process may hold no more file descriptors than that (ulimit -n)."""
    owns_log = log_path is None
    if log_path is None:
        with tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False) as log_file:
            log_path = Path(log_file.name)
    with log_path.open("wb") as log:
        started_at = time.perf_counter()
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environ or {})},
            preexec_fn=None if max_open_files is None else lambda: _limit_open_files(max_open_files),
        )
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, started_at, owns_log)


def _limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def wait_for_status(server: ServerProcess, path: str, timeout_s: float, expected: int = 200) -> float:
    """Polls `path` until it answers `expected`; returns seconds since the process started. RuntimeError with the
    log's tail if the process exits or the time runs out."""
    import httpx

    deadline = time.perf_counter() + timeout_s
    with httpx.Client(timeout=5) as client:
        while time.perf_counter() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.get(server.url + path).status_code == expected:
                    return time.perf_counter() - server.started_at
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
    raise RuntimeError(f"{path} did not answer {expected} within {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess) -> None:
    """Ctrl+C (SIGINT), as a user stops it; killed if it has not exited within STOP_TIMEOUT_S."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=STOP_TIMEOUT_S)
    if server.owns_log:
        server.log_path.unlink(missing_ok=True)


@contextmanager
def server_process(
    command: Sequence[str],
    port: int,
    ready_timeout_s: float = 600,
    log_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    max_open_files: int | None = None,
) -> Iterator[ServerProcess]:
    """Starts a server process, waits (bounded) for /ready 200, and stops it when the block ends."""
    server = start_server(command, port, log_path, environ, max_open_files)
    try:
        wait_for_status(server, "/ready", ready_timeout_s)
        yield server
    finally:
        stop_server(server)
