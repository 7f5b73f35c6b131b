"""What every response carries and what a hostile page or a careless client cannot do, against the real server:
CORS with a public Host (as behind Container Apps), security headers, the session cookie's SameSite, the cap on
request bodies, and /health staying fast while the largest requests are handled."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference_app.prompt_limits import MAX_CHARS_PER_TOKEN
from inference_app.settings import Settings
from inference_app.web.security import HSTS
from tests.app.server_harness import RunningServer, app_process, running_server
from tests.model_factory import ModelFolders
from tests.server_process import wait_for

pytestmark = pytest.mark.slow

PUBLIC_HOST = "chat.example.com"
ALLOWED_ORIGIN = "https://portal.example.org"
MAX_REQUEST_BYTES = 64 * 1024
USERNAME, PASSWORD = "admin", "correct-horse-battery-42"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tiny_settings: Settings) -> Iterator[RunningServer]:
    settings = dataclasses.replace(
        tiny_settings, allowed_origins=(ALLOWED_ORIGIN,), max_request_bytes=MAX_REQUEST_BYTES
    )
    with running_server(settings) as running:
        yield running


def public(origin: str | None = None, **headers: str) -> dict[str, str]:
    """Headers of a browser on a page of `origin` calling the app at its public address."""
    return {"Host": PUBLIC_HOST, **({} if origin is None else {"Origin": origin}), **headers}


# ---- CORS ----

# Gradio's routes, the API and a probe; each answers 200 without credentials here.
READ_ROUTES = ["/config", "/gradio_api/info", "/v1/models", "/health"]


@pytest.mark.parametrize("path", READ_ROUTES)
@pytest.mark.parametrize("origin", ["https://evil.example", "null", f"http://{PUBLIC_HOST}.evil.example"])
def test_other_origins_cannot_read_responses(server: RunningServer, path: str, origin: str) -> None:
    response = httpx.get(f"{server.url}{path}", headers=public(origin), timeout=10)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers

    preflight = httpx.options(
        f"{server.url}{path}",
        headers=public(origin, **{"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}),
        timeout=10,
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("path", READ_ROUTES)
def test_the_configured_origin_can_read_responses_with_credentials(server: RunningServer, path: str) -> None:
    response = httpx.get(f"{server.url}{path}", headers=public(ALLOWED_ORIGIN), timeout=10)
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    preflight = httpx.options(
        f"{server.url}{path}",
        headers=public(ALLOWED_ORIGIN, **{"Access-Control-Request-Method": "POST"}),
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_the_apps_own_pages_work_at_a_public_address(server: RunningServer) -> None:
    own = f"https://{PUBLIC_HOST}"
    assert httpx.get(f"{server.url}/config", headers=public(own), timeout=10).status_code == 200
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", headers=public(own), json={"messages": USER, "max_tokens": 2}, timeout=30
    )
    assert reply.status_code == 200, reply.text


# ---- headers on every answer ----

ANSWERS: dict[str, tuple[str, str, Any]] = {
    # id: (method, path, JSON body)
    "health": ("GET", "/health", None),
    "ready": ("GET", "/ready", None),
    "ui-page": ("GET", "/", None),
    "ui-config": ("GET", "/config", None),
    "api": ("GET", "/v1/models", None),
    "api-error": ("POST", "/v1/chat/completions", {"messages": []}),
    "unknown-api-url": ("GET", "/v1/nothing", None),
    "too-large": ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}),
    "docs": ("GET", "/docs", None),
}


@pytest.mark.parametrize(("method", "path", "body"), ANSWERS.values(), ids=ANSWERS.keys())
def test_every_answer_forbids_framing_and_sniffing_and_names_no_server(
    server: RunningServer, method: str, path: str, body: Any
) -> None:
    response = httpx.request(method, f"{server.url}{path}", json=body, headers=public(), timeout=30)
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers
    assert "strict-transport-security" not in response.headers  # plain HTTP: browsers would ignore it anyway

    # Behind the platform's HTTPS ingress (a proxy uvicorn trusts: here 127.0.0.1, its default).
    https = httpx.request(
        method, f"{server.url}{path}", json=body, headers=public(**{"X-Forwarded-Proto": "https"}), timeout=30
    )
    assert https.headers["strict-transport-security"] == HSTS


def test_the_session_cookie_is_not_sent_by_other_sites(tiny_settings: Settings) -> None:
    settings = dataclasses.replace(tiny_settings, auth_username=USERNAME, auth_password=PASSWORD)
    with running_server(settings, start_loading=False) as password_server:
        login = httpx.post(
            f"{password_server.url}/login",
            data={"username": USERNAME, "password": PASSWORD},
            headers=public(f"https://{PUBLIC_HOST}", **{"X-Forwarded-Proto": "https"}),
            timeout=10,
        )
    assert login.status_code == 200
    cookies = login.headers.get_list("set-cookie")
    assert len(cookies) == 2  # Gradio's secure and plain session cookies
    for cookie in cookies:
        attributes = [attribute.strip().lower() for attribute in cookie.split(";")]
        assert "samesite=lax" in attributes, cookie
        assert "httponly" in attributes, cookie
        assert "samesite=none" not in attributes, cookie


# ---- request size ----


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "request_too_large")
    assert str(MAX_REQUEST_BYTES) in error["message"]


def body_of(size: int) -> bytes:
    """A chat completion request of exactly `size` bytes."""
    empty = b'{"messages": [{"role": "user", "content": ""}], "max_tokens": 1}'
    return empty.replace(b'""', b'"' + b"x" * (size - len(empty)) + b'"')


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_get_413_on_every_route(server: RunningServer, chunked: bool) -> None:
    def post(path: str, body: bytes) -> httpx.Response:
        content: Any = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
        headers = {"content-type": "application/json"}
        return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)

    at_the_limit = post("/v1/chat/completions", body_of(MAX_REQUEST_BYTES))
    assert at_the_limit.json()["error"]["code"] == "context_length_exceeded"  # read whole, and too long for the model
    assert_too_large(post("/v1/chat/completions", body_of(MAX_REQUEST_BYTES + 1)))
    assert_too_large(post("/gradio_api/queue/join", body_of(MAX_REQUEST_BYTES + 1)))  # the UI's routes too
    assert_too_large(post("/v1/chat/completions", b"x" * (50 * 1024 * 1024)))


def send_until_stopped(url: str, body: bytes, stop: Any, answers: Any) -> None:
    """Posts `body` to the chat completions over and over, counting the answers by status (in its own process)."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            response = client.post(
                f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            answers[response.status_code] = answers.get(response.status_code, 0) + 1


def test_health_answers_within_100_ms_while_the_largest_requests_are_handled(
    model_folders: ModelFolders, tmp_path: Path
) -> None:
    """With the default limit (1 MiB), in its own process as in the container: clients keep sending the largest
    bodies allowed (one message of 1 MiB, refused by its length; one as long as the context could hold, tokenized
    and refused), larger ones (50 MB, refused by the limit) and a long prompt that is answered, while a probe
    measures /health. The clients run in processes
    of their own, so that the probe measures the server, not this process's contention."""
    limit = Settings().max_request_bytes
    arguments = ["--model", str(model_folders.model_path), "--adapter", str(model_folders.adapter_path)]
    answered = {"messages": [{"role": "user", "content": "Tell me a story about a cat. " * 40}], "max_tokens": 50}
    loads = [
        body_of(limit),
        body_of(512 * MAX_CHARS_PER_TOKEN),
        b"x" * (50 * 1024 * 1024),
        json.dumps(answered).encode(),
    ]
    processes = multiprocessing.get_context("spawn")

    with app_process(arguments, tmp_path / "server.log") as url, processes.Manager() as manager:
        stop, answers = manager.Event(), manager.dict()
        senders = [processes.Process(target=send_until_stopped, args=(url, body, stop, answers)) for body in loads]
        for sender in senders:
            sender.start()
        latencies = []
        try:
            wait_for(lambda: len(answers) == 3, 60, "answers of every kind (200, 400, 413): the whole load is on")
            with httpx.Client(base_url=url, timeout=5) as probe:
                for _ in range(50):
                    started = time.perf_counter()
                    assert probe.get("/health").status_code == 200
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.05)
        finally:
            stop.set()
            for sender in senders:
                sender.join(30)
        statuses = dict(answers)
    print(
        f"/health under load: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} probes; large requests answered: {statuses}"
    )
    assert set(statuses) == {200, 400, 413}  # nothing else: no 500, no 429
    assert max(latencies) < 0.1
