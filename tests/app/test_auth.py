"""Password mode (INFERENCE_AUTH_PASSWORD set): the API and the UI refuse without credentials and work with them.

Against the real server on 127.0.0.1: the official `openai` client, plain HTTP (bearer and basic auth), Gradio's
own API, and Gradio's login form in a real browser; and `python -m inference_app` itself, for its logs.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import gradio_client
import gradio_client.exceptions
import httpx
import openai
import pytest
from playwright.sync_api import Page, expect

from inference_app.auth import INVALID_CREDENTIALS_MESSAGE
from inference_app.generation import ModelService
from inference_app.server import build_app
from inference_app.settings import Settings
from inference_app.ui import CHAT_API_NAME
from tests.app.server_harness import RunningServer, running_server, wait_for
# The browser and page fixtures of the chat UI tests (the page opens this module's `server`).
from tests.app.test_browser import bot_messages, browser, message_box, page, send  # noqa: F401
from tests.model_factory import ModelFolders

pytestmark = pytest.mark.slow

USERNAME = "admin"
PASSWORD = "correct:horse-Battery-staple-42"  # with a ":": basic auth splits on the first one
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story about a cat."}]  # Any: openai's TypedDicts
REFUSAL_BODY = {
    "error": {
        "message": INVALID_CREDENTIALS_MESSAGE,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
SUBPROCESS_TIMEOUT_S = 120


def basic(credentials: str | bytes) -> str:
    raw = credentials.encode() if isinstance(credentials, str) else credentials
    return "Basic " + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def auth_settings(tiny_settings: Settings) -> Settings:
    return dataclasses.replace(tiny_settings, auth_username=USERNAME, auth_password=PASSWORD)


@pytest.fixture(scope="module")
def server(auth_settings: Settings) -> Iterator[RunningServer]:
    with running_server(auth_settings) as running:
        yield running


def openai_client(server: RunningServer, api_key: str) -> openai.OpenAI:
    # No retries: a failure must show, not be retried away.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def assert_refused(response: httpx.Response) -> None:
    """The one refusal: the same status, header and body whatever was wrong (so it cannot echo what was sent)."""
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="inference"'
    assert response.json() == REFUSAL_BODY


# --- API -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "request_headers"),
    [
        # The client insists on a key; leaving out its Authorization header is how to send none.
        pytest.param("unused", {"Authorization": openai.omit}, id="no key"),
        pytest.param("wrong-password", {}, id="wrong key"),
        pytest.param(PASSWORD + "x", {}, id="longer"),
        pytest.param(PASSWORD[:-1], {}, id="shorter"),
        pytest.param(f"{USERNAME}:{PASSWORD}", {}, id="user:password as key"),
    ],
)
def test_openai_client_without_the_password_is_refused(
    server: RunningServer, api_key: str, request_headers: dict[str, Any]
) -> None:
    with openai_client(server, api_key) as client:
        with pytest.raises(openai.AuthenticationError) as error_info:
            client.chat.completions.create(
                model="adapter", messages=MESSAGES, max_tokens=4, extra_headers=request_headers
            )
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=request_headers)
    error = error_info.value
    assert error.status_code == 401
    assert error.response.json() == REFUSAL_BODY


def test_openai_client_with_the_password_chats(server: RunningServer) -> None:
    with openai_client(server, PASSWORD) as client:
        assert [model.id for model in client.models.list()] == ["adapter"]
        completion = client.chat.completions.create(model="adapter", messages=MESSAGES, max_tokens=8, temperature=0)
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens == 8

        stream = client.chat.completions.create(
            model="adapter", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == completion.choices[0].message.content


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no header"),
        pytest.param("Bearer", id="empty bearer"),
        pytest.param("Bearer wrong-password", id="wrong bearer"),
        pytest.param(f"Token {PASSWORD}", id="unknown scheme"),
        pytest.param(PASSWORD, id="no scheme"),
        pytest.param("Basic !!not-base64!!", id="malformed basic"),
        pytest.param(basic(PASSWORD.replace(":", "")), id="basic without colon"),
        pytest.param(basic(b"admin:\xff\xfe"), id="basic not utf-8"),
        pytest.param(basic(f"{USERNAME}:wrong-password"), id="basic wrong password"),
        pytest.param(basic(f"root:{PASSWORD}"), id="basic wrong user"),
        pytest.param(basic(f":{PASSWORD}"), id="basic empty user"),
    ],
)
def test_every_refusal_is_the_same_401_and_echoes_nothing(server: RunningServer, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    requests = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
        ("POST", "/v1/chat/completions", {"not": "a valid request"}),  # refused before validation
        ("GET", "/v1/no-such-route", None),  # refused before the 404
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
    ]
    for method, path, body in requests:
        response = httpx.request(method, f"{server.url}{path}", headers=headers, json=body, timeout=10)
        assert_refused(response)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {PASSWORD}", id="bearer"),
        pytest.param(f"bEARER {PASSWORD}", id="bearer, scheme in any case"),
        pytest.param(basic(f"{USERNAME}:{PASSWORD}"), id="basic"),
        pytest.param(basic(f"{USERNAME}:{PASSWORD}").replace("Basic", "BASIC"), id="basic, scheme in any case"),
    ],
)
def test_bearer_and_basic_credentials_open_the_api_and_its_docs(server: RunningServer, authorization: str) -> None:
    headers = {"Authorization": authorization}
    models = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
    assert models.status_code == 200
    assert [model["id"] for model in models.json()["data"]] == ["adapter"]
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=headers,
        json={"messages": MESSAGES, "max_tokens": 4, "temperature": 0},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    schema = httpx.get(f"{server.url}/openapi.json", headers=headers, timeout=10)
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    docs = httpx.get(f"{server.url}/docs", headers=headers, timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_curl_style_basic_auth(server: RunningServer) -> None:
    """What `curl -u admin:<password>` sends: httpx builds the header itself."""
    assert httpx.get(f"{server.url}/v1/models", auth=(USERNAME, PASSWORD), timeout=10).status_code == 200
    assert_refused(httpx.get(f"{server.url}/v1/models", auth=("root", PASSWORD), timeout=10))


def test_health_probes_need_no_credentials(server: RunningServer) -> None:
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_credentials_are_checked_before_anything_else(auth_settings: Settings) -> None:
    """While the model loads, the API answers 503, but only to a client with the password."""
    with running_server(auth_settings, start_loading=False) as loading:
        assert_refused(httpx.post(f"{loading.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=10))
        with_password = httpx.post(
            f"{loading.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {PASSWORD}"},
            json={"messages": MESSAGES},
            timeout=10,
        )
        assert with_password.status_code == 503
        assert httpx.get(f"{loading.url}/ready", timeout=10).status_code == 503  # the probe still sees the state


# --- Gradio's own API ----------------------------------------------------------------------------------------------


def test_gradio_api_needs_the_login_cookie(server: RunningServer) -> None:
    login_check = httpx.get(f"{server.url}/gradio_api/login_check", timeout=10)
    assert login_check.status_code == 401
    assert login_check.json()["detail"]["error"] == "Not authenticated"
    assert httpx.get(f"{server.url}/config", timeout=10).status_code == 401
    # A bearer token is for the OpenAI API: Gradio wants its login.
    bearer = {"Authorization": f"Bearer {PASSWORD}"}
    assert httpx.get(f"{server.url}/gradio_api/login_check", headers=bearer, timeout=10).status_code == 401

    wrong = httpx.post(f"{server.url}/login", data={"username": USERNAME, "password": "wrong"}, timeout=10)
    assert wrong.status_code == 400 and wrong.json()["detail"] == "Incorrect credentials."
    wrong_user = httpx.post(f"{server.url}/login", data={"username": "root", "password": PASSWORD}, timeout=10)
    assert wrong_user.status_code == 400

    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/login", data={"username": USERNAME, "password": PASSWORD}).status_code == 200
        assert client.get("/gradio_api/login_check").status_code == 200
        assert client.get("/config").status_code == 200


def test_gradio_client_signs_in_with_the_password(server: RunningServer) -> None:
    with pytest.raises(gradio_client.exceptions.AuthenticationError):
        gradio_client.Client(server.url, verbose=False, download_files=False)
    client = gradio_client.Client(server.url, auth=(USERNAME, PASSWORD), verbose=False, download_files=False)
    reply = client.predict("Hello, world!", "", 4, 0.0, 1.0, 0, api_name=f"/{CHAT_API_NAME}")
    assert isinstance(reply, str) and reply


def test_the_password_is_never_served(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {PASSWORD}"}
    answers = [
        httpx.get(f"{server.url}/ready", timeout=10),
        httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10),
        httpx.get(f"{server.url}/openapi.json", headers=headers, timeout=10),
    ]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers += [client.post("/login", data={"username": USERNAME, "password": PASSWORD})]
        answers += [client.get("/config"), client.get("/gradio_api/info"), client.get("/")]
    for answer in answers:
        assert answer.status_code == 200, answer.request.url
        assert PASSWORD not in answer.text, answer.request.url
    assert PASSWORD not in repr(server.settings)


def test_startup_log_names_the_mode_without_the_password(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference_app.server")
    for settings in (tiny_settings, dataclasses.replace(tiny_settings, auth_password=PASSWORD)):
        build_app(settings, ModelService(settings))
    assert [record.getMessage() for record in caplog.records if record.name == "inference_app.server"] == [
        "authentication: off (INFERENCE_AUTH_PASSWORD not set)",
        "authentication: password (user admin)",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_command_takes_the_password_from_its_environment_and_never_logs_it(model_folders: ModelFolders) -> None:
    """`python -m inference_app` as the container runs it: the password in INFERENCE_AUTH_PASSWORD (ACA's secretRef),
    uvicorn's access log on; refused and accepted requests of every kind leave no trace of the password."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "inference_app", "--host", "127.0.0.1", "--port", str(port)]
    environ = {
        **os.environ,
        "INFERENCE_MODEL": str(model_folders.model_path),
        "INFERENCE_ADAPTER": str(model_folders.adapter_path),
        "INFERENCE_AUTH_USERNAME": USERNAME,
        "INFERENCE_AUTH_PASSWORD": PASSWORD,
    }
    process = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, SUBPROCESS_TIMEOUT_S, "/ready")
        assert_refused(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10))
        assert_refused(httpx.get(f"{url}/v1/models", auth=("root", PASSWORD), timeout=10))
        ok = httpx.post(
            f"{url}/v1/chat/completions", auth=(USERNAME, PASSWORD), json={"messages": MESSAGES, "max_tokens": 4}
        )
        assert ok.status_code == 200
        assert httpx.post(f"{url}/login", data={"username": USERNAME, "password": "wrong"}).status_code == 400
        assert httpx.post(f"{url}/login", data={"username": USERNAME, "password": PASSWORD}).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert "authentication: password (user admin)" in output
    assert '"GET /v1/models HTTP/1.1" 401' in output  # the access log is on: the check below means something
    assert PASSWORD not in output


# --- the login form, in a browser ----------------------------------------------------------------------------------


def log_in(page: Page, username: str, password: str) -> None:
    page.get_by_label("username").fill(username)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


@pytest.mark.browser
def test_ui_asks_for_the_password_and_chats_once_signed_in(page: Page) -> None:
    chat_heading = page.get_by_role("heading", name="Chat with Phi-3-mini-4k-instruct + LoRA adapter")
    expect(page.get_by_text("pulumi stack output --show-secrets accessPassword")).to_be_visible()  # auth_message
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    expect(chat_heading).to_have_count(0)

    log_in(page, USERNAME, "wrong-password")
    expect(page.get_by_text("Incorrect credentials")).to_be_visible()
    expect(chat_heading).to_have_count(0)
    expect(page.get_by_placeholder("Type a message...")).to_have_count(0)

    log_in(page, USERNAME, PASSWORD)
    expect(chat_heading).to_be_visible()
    send(page, "Hello, world!")
    expect(bot_messages(page)).to_have_count(1)
    expect(message_box(page)).to_be_editable()  # the reply is complete
    assert bot_messages(page).first.inner_text().strip()
