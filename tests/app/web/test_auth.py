"""Password mode (INFERENCE_AUTH_PASSWORD set): the API and the UI refuse without credentials and work with them.

Against the real server on 127.0.0.1: the official `openai` client, plain HTTP (bearer and basic auth), Gradio's
own API, and Gradio's login form in a real browser; and `python -m inference_app` itself, for its logs.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio_client
import gradio_client.exceptions
import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect

from inference_app.server import build_app
from inference_app.service import ModelService
from inference_app.settings import AdapterOption, Settings
from inference_app.web.auth import INVALID_CREDENTIALS_MESSAGE, GuessingBrake, login_message
from inference_app.web.ui import CHAT_API_NAME, SIGN_OUT_BUTTON
from tests.app.browser_harness import bot_messages, choose_greedy_decoding, message_box, open_page, send
from tests.app.server_harness import TINY_MODEL_INFO, RunningServer, app_process, running_server
from tests.model_factory import ModelFolders
from tests.server_process import wait_for

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


@pytest.fixture(autouse=True)
def forget_failed_sign_ins(server: RunningServer) -> None:
    """Each test starts with no failed sign-ins on record: the tests all come from 127.0.0.1, and the brake on
    password guessing would otherwise refuse a test for the failures of the tests before it."""
    server.app.state.guessing_brake.record_success("127.0.0.1")


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
                model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, max_tokens=4, extra_headers=request_headers
            )
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=request_headers)
    error = error_info.value
    assert error.status_code == 401
    assert error.response.json() == REFUSAL_BODY


def test_openai_client_with_the_password_chats(server: RunningServer) -> None:
    with openai_client(server, PASSWORD) as client:
        assert [model.id for model in client.models.list()] == ["Phi-3-mini-4k-instruct-ft", "Phi-3-mini-4k-instruct"]
        completion = client.chat.completions.create(
            model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens == 8

        stream = client.chat.completions.create(
            model="Phi-3-mini-4k-instruct-ft", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
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


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
PROTECTED_PATHS = ["/v1/models", "/v1/chat/completions", "/v1/no-such-route", "/openapi.json", "/docs"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_of_every_api_path_needs_the_password(server: RunningServer, method: str) -> None:
    """None falls through to Gradio's routes (HEAD /openapi.json did) or tells a stranger which methods exist."""
    for path in PROTECTED_PATHS:
        response = httpx.request(method, f"{server.url}{path}", timeout=10)
        if method == "HEAD":  # the same refusal without its body
            assert (response.status_code, response.headers["WWW-Authenticate"]) == (401, 'Bearer realm="inference"')
        else:
            assert_refused(response)


def test_with_the_password_a_path_answers_405_to_the_methods_it_does_not_serve(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {PASSWORD}"}
    for path in ["/v1/models", "/openapi.json", "/docs"]:
        head = httpx.head(f"{server.url}{path}", headers=headers, timeout=10)
        get = httpx.get(f"{server.url}{path}", headers=headers, timeout=10)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == get.headers["content-length"]
        assert httpx.delete(f"{server.url}{path}", headers=headers, timeout=10).status_code == 405
    wrong_method = httpx.get(f"{server.url}/v1/chat/completions", headers=headers, timeout=10)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


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
    assert [model["id"] for model in models.json()["data"]] == ["Phi-3-mini-4k-instruct-ft", "Phi-3-mini-4k-instruct"]
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


def test_health_probes_need_no_credentials_and_tell_anonymous_callers_only_the_status(server: RunningServer) -> None:
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    wrong = httpx.get(f"{server.url}/ready", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert (wrong.status_code, wrong.json()) == (200, {"status": "ready"})
    with_password = httpx.get(f"{server.url}/ready", headers={"Authorization": f"Bearer {PASSWORD}"}, timeout=10)
    assert with_password.json() == {"status": "ready", **TINY_MODEL_INFO}


def test_a_failed_load_is_explained_to_authenticated_callers_and_the_log_only(
    auth_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing_adapter = tmp_path / "no-such-adapter"
    failing_settings = dataclasses.replace(auth_settings, adapters=(AdapterOption(None, missing_adapter),))
    with running_server(failing_settings, start_loading=False) as failing:
        loading = httpx.get(f"{failing.url}/ready", timeout=10)
        assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
        failing.service.start_loading()
        wait_for(lambda: failing.service.status == "failed", 30, "loading to fail")
        anonymous = httpx.get(f"{failing.url}/ready", timeout=10)
        authenticated = httpx.get(f"{failing.url}/ready", auth=(USERNAME, PASSWORD), timeout=10)
    assert (anonymous.status_code, anonymous.json()) == (503, {"status": "failed"})
    assert authenticated.status_code == 503
    assert str(missing_adapter) in authenticated.json()["reason"]
    assert str(missing_adapter) in caplog.text  # the operator's log has it


# --- the brake on password guessing --------------------------------------------------------------------------------


def assert_braked(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) <= GuessingBrake.WINDOW_S
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_failed_sign_ins")


@pytest.mark.parametrize("guess_with", ["bearer", "basic", "login form"])
def test_repeated_failures_from_one_address_are_braked_for_that_address_only(
    server: RunningServer, guess_with: str
) -> None:
    def guess(password: str, headers: dict[str, str] | None = None) -> httpx.Response:
        if guess_with == "login form":
            return httpx.post(
                f"{server.url}/login", data={"username": USERNAME, "password": password}, headers=headers, timeout=10
            )
        authorization = f"Bearer {password}" if guess_with == "bearer" else basic(f"{USERNAME}:{password}")
        return httpx.get(f"{server.url}/v1/models", headers={"Authorization": authorization, **(headers or {})})

    for attempt in range(GuessingBrake.MAX_FAILURES):
        assert guess(f"wrong-{attempt}").status_code in (400, 401)
    # Braked on every path, even with the right password (the guesser must not learn it is right).
    assert_braked(guess(PASSWORD))
    assert_braked(httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {PASSWORD}"}))
    assert_braked(httpx.post(f"{server.url}/login", data={"username": USERNAME, "password": PASSWORD}))
    # Requests without credentials are not guesses: the probes and the login page still answer.
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/", timeout=10).status_code == 200
    # Another address (behind a proxy uvicorn trusts: here 127.0.0.1, its default) is not affected.
    elsewhere = {"X-Forwarded-For": "203.0.113.7"}
    assert guess(PASSWORD, headers=elsewhere).status_code == 200


def test_another_sites_page_can_neither_sign_in_nor_spend_the_visitors_budget(server: RunningServer) -> None:
    """A page on another site posting wrong passwords to /login from the visitor's browser (from their address)."""
    foreign = {"Origin": "https://evil.example"}
    for attempt in range(GuessingBrake.MAX_FAILURES + 2):
        login = {"username": USERNAME, "password": f"wrong-{attempt}"}
        response = httpx.post(f"{server.url}/login", data=login, headers=foreign, timeout=10)
        assert response.status_code == 403, response.text
    right = {"username": USERNAME, "password": PASSWORD}
    assert httpx.post(f"{server.url}/login", data=right, headers=foreign, timeout=10).status_code == 403
    # The visitor, on the app's own page, signs in at once.
    own_page = {"Origin": server.url}
    assert httpx.post(f"{server.url}/login", data=right, headers=own_page, timeout=10).status_code == 200


def test_forged_forwarded_addresses_do_not_escape_the_brake(server: RunningServer) -> None:
    """Behind a trusted proxy, the client is the last address the proxy appended; whatever a guesser writes before
    it changes nothing."""
    for attempt in range(GuessingBrake.MAX_FAILURES):
        forged = {"X-Forwarded-For": f"198.51.100.{attempt}, 203.0.113.9", "Authorization": "Bearer wrong"}
        assert httpx.get(f"{server.url}/v1/models", headers=forged, timeout=10).status_code == 401
    forged = {"X-Forwarded-For": "198.51.100.99, 203.0.113.9", "Authorization": f"Bearer {PASSWORD}"}
    assert_braked(httpx.get(f"{server.url}/v1/models", headers=forged, timeout=10))


def test_the_brake_lets_the_address_try_again_within_a_minute() -> None:
    now = [1000.0]
    brake = GuessingBrake(clock=lambda: now[0])
    for _ in range(GuessingBrake.MAX_FAILURES - 1):
        brake.record_failure("198.51.100.1")
        now[0] += 1
    assert brake.retry_after("198.51.100.1") is None  # one more try
    brake.record_failure("198.51.100.1")
    assert brake.retry_after("198.51.100.1") == GuessingBrake.WINDOW_S - (GuessingBrake.MAX_FAILURES - 1)
    assert brake.retry_after("198.51.100.2") is None
    now[0] += GuessingBrake.WINDOW_S - GuessingBrake.MAX_FAILURES + 1
    assert brake.retry_after("198.51.100.1") is None  # the oldest failure is a minute old
    brake.record_failure("198.51.100.1")
    assert brake.retry_after("198.51.100.1") is not None  # still 10 failures within the last minute
    brake.record_success("198.51.100.1")
    assert brake.retry_after("198.51.100.1") is None


def many_addresses(count: int) -> Iterator[str]:
    return (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(count))


def test_the_brake_forgets_idle_addresses_beyond_its_bound() -> None:
    now = [0.0]
    brake = GuessingBrake(clock=lambda: now[0])
    for address in many_addresses(GuessingBrake.MAX_ADDRESSES):
        brake.record_failure(address)
    now[0] += GuessingBrake.WINDOW_S + 1
    brake.record_failure("198.51.100.1")
    assert brake.tracked_addresses == 1


def test_the_brake_costs_the_same_and_stays_bounded_with_many_recent_addresses() -> None:
    """Guessers from more addresses than the bound, all within the window: each failure reads the clock a fixed
    number of times (it does not scan the tracked addresses) and no more than MAX_ADDRESSES are kept."""
    clock_reads = [0]

    def clock() -> float:
        clock_reads[0] += 1
        return 1000.0

    brake = GuessingBrake(clock=clock)
    for address in many_addresses(GuessingBrake.MAX_ADDRESSES + 500):
        clock_reads[0] = 0
        brake.record_failure(address)
        assert clock_reads[0] <= 2
    assert brake.tracked_addresses == GuessingBrake.MAX_ADDRESSES
    for _ in range(GuessingBrake.MAX_FAILURES):  # a guesser is still braked with the bound reached
        brake.record_failure("198.51.100.1")
    assert brake.retry_after("198.51.100.1") is not None


def test_the_login_message_says_where_the_credentials_come_from(auth_settings: Settings) -> None:
    local = login_message(auth_settings, environ={})
    assert "--auth-password / INFERENCE_AUTH_PASSWORD" in local and "pulumi" not in local
    assert "The username is <code>admin</code>" in local
    deployed = login_message(auth_settings, environ={"CONTAINER_APP_NAME": "ca-phi3"})
    assert "pulumi stack output --show-secrets accessPassword" in deployed
    chosen_name = login_message(dataclasses.replace(auth_settings, auth_username="maria"), environ={})
    assert "maria" not in chosen_name and "The username is" not in chosen_name


# --- the same rules on every path ----------------------------------------------------------------------------------

NON_ASCII_PASSWORD = "pässwörd-Ωmega-🐎"


@pytest.fixture(scope="module")
def non_ascii_server(auth_settings: Settings) -> Iterator[RunningServer]:
    with running_server(dataclasses.replace(auth_settings, auth_password=NON_ASCII_PASSWORD)) as running:
        yield running


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        pytest.param(b"Bearer " + NON_ASCII_PASSWORD.encode(), True, id="bearer, UTF-8"),
        pytest.param(basic(f"{USERNAME}:{NON_ASCII_PASSWORD}").encode(), True, id="basic, UTF-8"),
        pytest.param(basic(f"  {USERNAME} :{NON_ASCII_PASSWORD}").encode(), True, id="basic, username with spaces"),
        pytest.param(b"Bearer " + NON_ASCII_PASSWORD.encode("latin-1", "replace"), False, id="bearer, latin-1"),
        pytest.param(b"Bearer " + NON_ASCII_PASSWORD.encode()[:-1], False, id="bearer, cut mid-character"),
        pytest.param(basic(f"{USERNAME}:{NON_ASCII_PASSWORD} ").encode(), False, id="basic, password with a space"),
    ],
)
def test_non_ascii_passwords_and_trimmed_usernames_on_every_path(
    non_ascii_server: RunningServer, authorization: bytes, accepted: bool
) -> None:
    non_ascii_server.app.state.guessing_brake.record_success("127.0.0.1")
    response = httpx.get(f"{non_ascii_server.url}/v1/models", headers=[(b"Authorization", authorization)], timeout=10)
    assert response.status_code == (200 if accepted else 401)


@pytest.mark.parametrize(
    ("username", "password", "accepted"),
    [
        (USERNAME, NON_ASCII_PASSWORD, True),
        (f" {USERNAME}  ", NON_ASCII_PASSWORD, True),
        (USERNAME, f" {NON_ASCII_PASSWORD}", False),
    ],
)
def test_the_login_form_follows_the_same_rules(
    non_ascii_server: RunningServer, username: str, password: str, accepted: bool
) -> None:
    non_ascii_server.app.state.guessing_brake.record_success("127.0.0.1")
    login = httpx.post(f"{non_ascii_server.url}/login", data={"username": username, "password": password}, timeout=10)
    assert login.status_code == (200 if accepted else 400)


# --- signing out ---------------------------------------------------------------------------------------------------


@contextmanager
def signed_in_client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/login", data={"username": USERNAME, "password": PASSWORD}).status_code == 200
        assert client.get("/config").status_code == 200
        yield client


def test_sign_out_is_a_same_origin_post_that_ends_only_the_callers_session(server: RunningServer) -> None:
    with signed_in_client(server) as mine, signed_in_client(server) as other:
        my_cookies = dict(mine.cookies)
        # Neither a link (GET) nor a form on another site signs anyone out.
        assert mine.get("/logout").status_code == 405
        assert mine.post("/logout", headers={"Origin": "https://evil.example"}).status_code == 403
        assert mine.get("/config").status_code == 200

        signed_out = mine.post("/logout", headers={"Origin": server.url})
        assert signed_out.status_code == 200
        assert mine.get("/config").status_code == 401
        # The session is over on the server too, not just forgotten by this client.
        assert httpx.get(f"{server.url}/config", cookies=my_cookies, timeout=10).status_code == 401
        assert other.get("/config").status_code == 200


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


def test_a_stranger_can_neither_hold_heartbeat_streams_nor_learn_the_model(server: RunningServer) -> None:
    """Gradio serves its heartbeat stream and its page's title (login page, /manifest.json) without the login."""
    assert httpx.get(f"{server.url}/gradio_api/heartbeat/any-session", timeout=10).status_code == 401
    for path in ["/manifest.json", "/"]:
        response = httpx.get(f"{server.url}{path}", timeout=10)
        assert response.status_code == 200
        assert "Phi-3" not in response.text and "adapter" not in response.text.lower(), path
    with signed_in_client(server) as client, client.stream("GET", "/gradio_api/heartbeat/my-session") as heartbeat:
        assert heartbeat.status_code == 200
        assert next(heartbeat.iter_lines()) == "data: ALIVE"


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


def test_the_command_takes_the_password_from_its_environment_and_never_logs_it(
    model_folders: ModelFolders, tmp_path: Path
) -> None:
    """`python -m inference_app` as the container runs it: the password in INFERENCE_AUTH_PASSWORD (ACA's secretRef),
    uvicorn's access log on; refused and accepted requests of every kind leave no trace of the password."""
    environ = {
        "INFERENCE_MODEL": str(model_folders.model_path),
        "INFERENCE_ADAPTERS": str(model_folders.adapter_path),
        "INFERENCE_AUTH_USERNAME": USERNAME,
        "INFERENCE_AUTH_PASSWORD": PASSWORD,
    }
    log_path = tmp_path / "server.log"
    with app_process(["--host", "127.0.0.1"], log_path, environ) as url:
        assert_refused(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10))
        assert_refused(httpx.get(f"{url}/v1/models", auth=("root", PASSWORD), timeout=10))
        ok = httpx.post(
            f"{url}/v1/chat/completions", auth=(USERNAME, PASSWORD), json={"messages": MESSAGES, "max_tokens": 4}
        )
        assert ok.status_code == 200
        assert httpx.post(f"{url}/login", data={"username": USERNAME, "password": "wrong"}).status_code == 400
        assert httpx.post(f"{url}/login", data={"username": USERNAME, "password": PASSWORD}).status_code == 200
    output = log_path.read_text()
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
    expect(page.get_by_text("--auth-password / INFERENCE_AUTH_PASSWORD")).to_be_visible()  # auth_message, local
    expect(page.get_by_text("The username is admin")).to_be_visible()
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    expect(chat_heading).to_have_count(0)

    log_in(page, USERNAME, "wrong-password")
    expect(page.get_by_text("Incorrect credentials")).to_be_visible()
    expect(chat_heading).to_have_count(0)
    expect(page.get_by_placeholder("Type a message...")).to_have_count(0)

    log_in(page, USERNAME, PASSWORD)
    expect(chat_heading).to_be_visible()
    choose_greedy_decoding(page)
    send(page, "Hello, world!")
    expect(bot_messages(page)).to_have_count(1)
    expect(message_box(page)).to_be_editable()  # the reply is complete
    assert bot_messages(page).first.inner_text().strip()

    page.get_by_role("button", name=SIGN_OUT_BUTTON).click()
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    expect(chat_heading).to_have_count(0)
    page.reload()
    expect(page.get_by_role("button", name="Login")).to_be_visible()


@pytest.mark.browser
def test_the_ui_has_no_sign_out_without_password_mode(tiny_settings: Settings, browser: Browser) -> None:
    with running_server(tiny_settings, start_loading=False) as open_server, open_page(browser, open_server.url) as page:
        expect(page.get_by_role("heading", name="Chat with Phi-3-mini-4k-instruct + LoRA adapter")).to_be_visible()
        expect(page.get_by_role("button", name=SIGN_OUT_BUTTON)).to_have_count(0)
