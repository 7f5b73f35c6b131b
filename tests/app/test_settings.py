"""Settings: every option from the command line or its INFERENCE_* environment variable, with clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference_app.settings import AdapterOption, Settings, environment_variables, parse_settings


def test_defaults_follow_the_toolkit_share_layout() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    assert settings.model_path == Path("/mount/model-cache/microsoft/Phi-3-mini-4k-instruct")
    assert settings.adapters == (AdapterOption(None, Path("/mount/models/qlora/qlora/gpu_model/adapter")),)
    assert settings.model_ids == ("Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct-ft")
    assert (settings.host, settings.port, settings.dtype) == ("127.0.0.1", 7860, "auto")
    assert settings.base_only is False and settings.quantize_4bit is False
    assert settings.merge_adapter is None and settings.should_merge_adapter is True
    assert settings.prompt_template is None


def test_every_flag_has_an_environment_variable() -> None:
    names = environment_variables()
    assert names["--model"] == "INFERENCE_MODEL"
    assert names["--adapter"] == "INFERENCE_ADAPTERS"
    assert names["--max-new-tokens-cap"] == "INFERENCE_MAX_NEW_TOKENS_CAP"
    assert len(names) == len(Settings.__dataclass_fields__)


def test_environment_sets_options_and_command_line_wins() -> None:
    environ = {
        "INFERENCE_MODEL": "/share/base",
        "INFERENCE_ADAPTERS": "/share/adapter",
        "INFERENCE_BASE_ONLY": "true",
        "INFERENCE_PORT": "8000",
        "INFERENCE_DTYPE": "float16",
        "INFERENCE_MERGE_ADAPTER": "no",
        "INFERENCE_MAX_CONCURRENT_GENERATIONS": "3",
        "INFERENCE_MAX_NEW_TOKENS_CAP": "64",
        "INFERENCE_PROMPT_TEMPLATE": "### Question: {}\\n### Answer:",
        "INFERENCE_MAX_BATCH_SIZE": "2",
        "INFERENCE_KV_CACHE_TOKENS": "8192",
    }
    settings = parse_settings(["--port", "9000", "--no-base-only"], environ=environ)
    assert settings.model_path == Path("/share/base")
    assert settings.adapters == (AdapterOption(None, Path("/share/adapter")),)
    assert settings.base_only is False
    assert settings.port == 9000
    assert settings.dtype == "float16"
    assert settings.merge_adapter is False and settings.should_merge_adapter is False
    assert settings.max_concurrent_generations == 3
    assert settings.max_new_tokens_cap == 64
    assert settings.prompt_template == "### Question: {}\n### Answer:"
    assert settings.max_batch_size == 2
    assert settings.kv_cache_tokens == 8192


def test_several_adapters_by_name_from_the_command_line_or_the_environment() -> None:
    environ = {"INFERENCE_MODEL": "/share/base", "INFERENCE_ADAPTERS": "run1=/share/run1, run2=/share/run2"}
    settings = parse_settings([], environ=environ)
    assert settings.served_adapters == (("run1", Path("/share/run1")), ("run2", Path("/share/run2")))
    assert settings.model_ids == ("base", "run1", "run2") and settings.served_model_id == "run1"
    # The flags replace the variable's list; a bare path is named after the base model.
    settings = parse_settings(["--adapter", "/share/a", "--adapter", "b.v2=/share/b"], environ=environ)
    assert settings.model_ids == ("base", "base-ft", "b.v2")
    assert parse_settings(["--base-only"], environ=environ).model_ids == ("base",)


def test_the_old_adapter_variable_is_refused_with_its_new_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], environ={"INFERENCE_ADAPTER": "/share/adapter"})
    assert "INFERENCE_ADAPTER is now INFERENCE_ADAPTERS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--adapter", "/a", "--adapter", "/b"], "two served models are named 'Phi-3-mini-4k-instruct-ft'"),
        (["--adapter", "x=/a", "--adapter", "x=/b"], "two served models are named 'x'"),
        (["--adapter", "Phi-3-mini-4k-instruct=/a"], "two served models are named 'Phi-3-mini-4k-instruct'"),
        (["--adapter", "my run=/a"], "give NAME=PATH with a name of letters"),
        (["--adapter", "=/a"], "give NAME=PATH"),
    ],
)
def test_adapter_names_clients_could_not_tell_apart_are_refused(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(arguments, environ={})
    assert message in capsys.readouterr().err


def test_authentication_is_off_unless_a_password_is_set() -> None:
    settings = parse_settings([], environ={})
    assert (settings.auth_username, settings.auth_password) == ("admin", None)
    names = environment_variables()
    assert names["--auth-username"] == "INFERENCE_AUTH_USERNAME"
    assert names["--auth-password"] == "INFERENCE_AUTH_PASSWORD"


def test_credentials_from_environment_or_command_line() -> None:
    environ = {"INFERENCE_AUTH_USERNAME": "alice@example.com", "INFERENCE_AUTH_PASSWORD": "from:env-12345"}
    settings = parse_settings([], environ=environ)
    assert (settings.auth_username, settings.auth_password) == ("alice@example.com", "from:env-12345")
    settings = parse_settings(["--auth-username", "bob", "--auth-password", "from-flag-12345"], environ=environ)
    assert (settings.auth_username, settings.auth_password) == ("bob", "from-flag-12345")
    # Exactly the shortest password accepted (as the Pulumi program's minimum), in any script.
    assert parse_settings(["--auth-password", "ünïcødé-pw12"], environ={}).auth_password == "ünïcødé-pw12"


def test_http_options_from_environment_or_command_line() -> None:
    defaults = parse_settings([], environ={})
    assert (defaults.max_request_bytes, defaults.allowed_origins) == (1024 * 1024, ())
    environ = {
        "INFERENCE_MAX_REQUEST_BYTES": "4096",
        "INFERENCE_ALLOWED_ORIGINS": "https://chat.example.com, http://localhost:3000/",
    }
    settings = parse_settings([], environ=environ)
    assert settings.max_request_bytes == 4096
    assert settings.allowed_origins == ("https://chat.example.com", "http://localhost:3000")
    settings = parse_settings(["--allowed-origins", "https://other.example"], environ=environ)
    assert settings.allowed_origins == ("https://other.example",)


def test_demo_options() -> None:
    assert (Settings().demo, Settings().demo_dir) == (False, None)
    settings = parse_settings(["--demo", "--demo-dir", "/tmp/demo"], environ={})
    assert (settings.demo, settings.demo_dir) == (True, Path("/tmp/demo"))


def test_the_password_stays_out_of_repr() -> None:
    settings = parse_settings([], environ={"INFERENCE_AUTH_PASSWORD": "s3cret-Value"})
    assert "s3cret-Value" not in repr(settings)
    assert "auth_username='admin'" in repr(settings)


def test_help_shows_no_password_from_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"], environ={"INFERENCE_AUTH_PASSWORD": "s3cret-Value"})
    assert "s3cret-Value" not in capsys.readouterr().out


def test_merge_defaults_off_when_quantized() -> None:
    assert parse_settings(["--quantize-4bit"], environ={}).should_merge_adapter is False
    assert parse_settings(["--quantize-4bit", "--merge-adapter"], environ={}).should_merge_adapter is True


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "0"], {}, "--port"),
        ([], {"INFERENCE_PORT": "http"}, "INFERENCE_PORT='http'"),
        ([], {"INFERENCE_DTYPE": "int8"}, "INFERENCE_DTYPE='int8': choose from auto"),
        ([], {"INFERENCE_BASE_ONLY": "maybe"}, "INFERENCE_BASE_ONLY='maybe': use true or false"),
        (["--max-new-tokens-cap", "-5"], {}, "--max-new-tokens-cap"),
        (["--prompt-template", "no placeholder"], {}, "--prompt-template"),
        (["--dtype", "int8"], {}, "--dtype"),
        # credentials (password mode)
        (
            [],
            {"INFERENCE_AUTH_PASSWORD": ""},
            "INFERENCE_AUTH_PASSWORD is set but empty: unset it to turn authentication off",
        ),
        (["--auth-password", ""], {}, "--auth-password: is set but empty: unset it to turn authentication off"),
        (
            [],
            {"INFERENCE_AUTH_PASSWORD": "short-pw-11"},
            "INFERENCE_AUTH_PASSWORD is shorter than 12 characters: choose a longer password",
        ),
        (["--auth-password", "ünïcødé-pw1"], {}, "--auth-password: is shorter than 12 characters"),
        ([], {"INFERENCE_AUTH_USERNAME": "ad:min"}, "INFERENCE_AUTH_USERNAME must be non-empty, without ':'"),
        ([], {"INFERENCE_AUTH_USERNAME": "ad min"}, "INFERENCE_AUTH_USERNAME must be non-empty, without ':'"),
        ([], {"INFERENCE_AUTH_USERNAME": ""}, "INFERENCE_AUTH_USERNAME must be non-empty"),
        (["--auth-username", "ad\tmin"], {}, "--auth-username: must be non-empty, without ':' or whitespace"),
        # HTTP
        (["--max-request-bytes", "0"], {}, "--max-request-bytes"),
        ([], {"INFERENCE_ALLOWED_ORIGINS": "chat.example.com"}, "INFERENCE_ALLOWED_ORIGINS has 'chat.example.com'"),
        (["--allowed-origins", "https://a.example/path"], {}, "--allowed-origins: has 'https://a.example/path'"),
        (["--allowed-origins", "ftp://a.example"], {}, "give origins as scheme://host[:port]"),
    ],
)
def test_invalid_values_exit_with_the_option_named(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, environ=environ)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_each_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"], environ={})
    help_text = " ".join(capsys.readouterr().out.split())
    for variable in environment_variables().values():
        assert variable in help_text


def test_command_help_runs_without_loading_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference_app", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "INFERENCE_ADAPTERS" in result.stdout


def test_web_facing_modules_do_not_import_torch() -> None:
    # The web layers import settings and generation; /health must answer while torch is still importing.
    code = "import sys, inference_app.service, inference_app.settings; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
