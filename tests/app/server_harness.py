"""Runs the real app (FastAPI routes + Gradio UI, uvicorn, ModelService with the tiny model) on 127.0.0.1.

`running_server` runs it on a background thread of the test process, so tests can also look at the ModelService
it serves (its status and engine counters); `app_process` runs `python -m inference_app` as users and the
container do. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from inference_app.server import AppServer, uvicorn_server
from inference_app.service import ModelService
from inference_app.settings import Settings
from tests.server_process import app_command, free_port, server_process, wait_for

STARTUP_TIMEOUT_S = 30
LOAD_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 10
STREAMS_END_AFTER_S = 1  # on shutdown, replies still streaming end this soon
PROCESS_READY_TIMEOUT_S = 120  # a fresh interpreter imports the whole stack before it loads the model
# What /ready details for the tests' tiny model and adapter (conftest's tiny_settings) on the CPU.
TINY_MODEL_INFO = {
    "model_id": "Phi-3-mini-4k-instruct",
    "adapter_ids": ["Phi-3-mini-4k-instruct-ft"],
    "device": "cpu",
    "dtype": "float32",
    "context_length": 512,
}


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    settings: Settings
    service: ModelService
    app: Any  # the FastAPI app served (its state holds the brake on password guessing)
    server: AppServer  # uvicorn's; server.should_exit = True is what SIGTERM does

    def wait_until_ready(self, timeout: float = LOAD_TIMEOUT_S) -> None:
        wait_for(lambda: httpx.get(f"{self.url}/ready", timeout=5).status_code == 200, timeout, "GET /ready = 200")


@contextmanager
def running_server(settings: Settings, *, start_loading: bool = True) -> Iterator[RunningServer]:
    """Serves `settings` on 127.0.0.1 and a free port until the block ends (settings.host still decides which Host
    names are answered).

    With start_loading, the model is loaded and the block starts once /ready is 200; without, the service
    stays in "loading" until the test calls service.start_loading().
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other servers
    port = listener.getsockname()[1]
    settings = dataclasses.replace(settings, port=port)  # settings.host only says which Host names are answered
    service = ModelService(settings)
    # Bounded graceful shutdown: open streams (Gradio's event stream, a test's unfinished reply) are ended then cut.
    server = uvicorn_server(settings, service, log_level="warning", streams_end_after_s=STREAMS_END_AFTER_S)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    running = RunningServer(
        url=f"http://127.0.0.1:{port}", settings=settings, service=service, app=server.config.app, server=server
    )
    try:
        wait_for(lambda: server.started, STARTUP_TIMEOUT_S, "uvicorn started")
        if start_loading:
            service.start_loading()
            running.wait_until_ready()
        yield running
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT_S)
        service.close()
        listener.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def sse_events(response: httpx.Response) -> Iterator[Any]:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            assert line == "", f"unexpected line in the event stream: {line!r}"
            continue
        data = line.removeprefix("data: ")
        yield data if data == "[DONE]" else json.loads(data)


def engine_is_idle(service: ModelService) -> bool:
    """No generation running or waiting."""
    stats = service.generation_stats()
    return stats["running"] == 0 and stats["waiting"] == 0


@contextmanager
def app_process(
    arguments: list[str],
    log_path: Path,
    environ: Mapping[str, str] | None = None,
    max_open_files: int | None = None,
) -> Iterator[str]:
    """Runs `python -m inference_app <arguments>` on a free port (stdout and stderr into log_path) and yields its URL
    once /ready is 200; stops it with SIGINT (Ctrl+C) when the block ends. With max_open_files, the process may hold
    no more file descriptors than that (ulimit -n)."""
    port = free_port()
    command = app_command(port, arguments)
    with server_process(command, port, PROCESS_READY_TIMEOUT_S, log_path, environ, max_open_files) as server:
        yield server.url
