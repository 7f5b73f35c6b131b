"""Runs the real app (FastAPI routes + Gradio UI, uvicorn, ModelService with the tiny model) on 127.0.0.1.

The server runs on a background thread of the test process, so tests can also look at the ModelService it
serves (its status and engine counters). Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from inference_app.generation import ModelService
from inference_app.server import build_app
from inference_app.settings import Settings

STARTUP_TIMEOUT_S = 30
LOAD_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 10


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    settings: Settings
    service: ModelService

    def wait_until_ready(self, timeout: float = LOAD_TIMEOUT_S) -> None:
        wait_for(lambda: httpx.get(f"{self.url}/ready", timeout=5).status_code == 200, timeout, "GET /ready = 200")


@contextmanager
def running_server(settings: Settings, *, start_loading: bool = True) -> Iterator[RunningServer]:
    """Serves `settings` (host and port replaced by 127.0.0.1 and a free port) until the block ends.

    With start_loading, the model is loaded and the block starts once /ready is 200; without, the service
    stays in "loading" until the test calls service.start_loading().
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other servers
    port = listener.getsockname()[1]
    settings = dataclasses.replace(settings, host="127.0.0.1", port=port)
    service = ModelService(settings)
    # Bounded graceful shutdown: open streams (Gradio's event stream, a test's unfinished reply) are cut.
    config = uvicorn.Config(build_app(settings, service), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    running = RunningServer(url=f"http://127.0.0.1:{port}", settings=settings, service=service)
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


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
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


def sse_events(response: httpx.Response) -> Iterator[Any]:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            assert line == "", f"unexpected line in the event stream: {line!r}"
            continue
        data = line.removeprefix("data: ")
        yield data if data == "[DONE]" else json.loads(data)
