"""The app's settings: command-line options, each also settable by an INFERENCE_* environment variable.

A command-line option wins over its environment variable, which wins over the default. The defaults follow the
AI Toolkit's layout on the Azure Files share mounted at /mount.

This module is the one definition of each option (field, flag, variable, rule): the engine's messages name options
through option_name, and the Pulumi program (infra/image_config.py, infra/access.py) reads the variables and rules
from here. It imports nothing heavy, since `pulumi up` imports it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "INFERENCE_"
DTYPES = ("auto", "bfloat16", "float16", "float32")
# Seconds the platform waits after SIGTERM before it kills the container: the Pulumi program sets the container
# app's terminationGracePeriodSeconds to this, and the server ends its streams in time (inference_app.server).
CONTAINER_TERMINATION_GRACE_S = 30
DEFAULT_ADAPTER_SUFFIX = "-ft"  # a bare --adapter PATH is served as <base model's name>-ft
_MODEL_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class AdapterOption:
    """One --adapter: NAME=PATH, or a bare PATH (name None: the default name, see Settings.adapter_names)."""

    name: str | None
    path: Path

    def __str__(self) -> str:
        return str(self.path) if self.name is None else f"{self.name}={self.path}"


def parse_adapter(text: str) -> AdapterOption:
    """NAME=PATH or PATH; raises argparse.ArgumentTypeError for a name a client could not send as its model."""
    name, separator, path = text.partition("=")
    if not separator:
        return AdapterOption(None, Path(text))
    if not name or not set(name) <= _MODEL_NAME_CHARACTERS or not path:
        raise argparse.ArgumentTypeError(
            f"has {text!r}: give NAME=PATH with a name of letters, digits, '.', '_' or '-', e.g. run2=/mount/run2"
        )
    return AdapterOption(name, Path(path))


_DEFAULT_ADAPTER = AdapterOption(None, Path("/mount/models/qlora/qlora/gpu_model/adapter"))


@dataclass(frozen=True)
class Settings:
    model_path: Path = Path("/mount/model-cache/microsoft/Phi-3-mini-4k-instruct")
    adapters: tuple[AdapterOption, ...] = (_DEFAULT_ADAPTER,)  # the first is the default model of a request
    base_only: bool = False
    host: str = "127.0.0.1"  # this machine only; the image sets INFERENCE_HOST=0.0.0.0 for its ingress
    port: int = 7860
    dtype: str = "auto"
    quantize_4bit: bool = False
    merge_adapter: bool | None = None  # None: merge unless quantized (merging into 4-bit weights is lossy)
    max_concurrent_generations: int | None = None  # None: as many as the KV cache holds (max_batch_size)
    max_generations_per_client: int | None = None  # None: no limit per client
    max_new_tokens_cap: int = 1024
    prompt_template: str | None = None
    load_with_mmap: bool = False
    max_batch_size: int | None = None  # None: 64 (fewer on a small GPU: inference_app.engine.kv_cache.plan_cache)
    max_batch_tokens: int | None = None  # None: no cap beyond the KV cache
    max_sequence_tokens: int | None = None  # None: the model's context
    kv_cache_tokens: int | None = None  # None: as many as the free memory holds
    cuda_graphs: bool = True
    prefill_chunk_tokens: int | None = None  # None: per device (inference_app.engine.model_runner)
    auth_username: str = "admin"
    auth_password: str | None = field(default=None, repr=False)  # None: no authentication; never logged
    max_request_bytes: int = 1024 * 1024
    allowed_origins: tuple[str, ...] = ()  # besides the app's own origin, which is always allowed
    forwarded_allow_ips: str = "127.0.0.1"  # uvicorn's default
    demo: bool = False
    demo_dir: Path | None = None  # None: ~/.cache/inference_app (inference_app.demo.demo_mode.default_demo_dir)

    @property
    def should_merge_adapter(self) -> bool:
        return (not self.quantize_4bit) if self.merge_adapter is None else self.merge_adapter

    @property
    def model_id(self) -> str:
        """The base model's name: its folder's name."""
        return self.model_path.name

    @property
    def served_adapters(self) -> tuple[tuple[str, Path], ...]:
        """Each adapter served, by name: a bare path is named <base model>-ft; none in base-only mode."""
        if self.base_only:
            return ()
        return tuple(
            (adapter.name or self.model_id + DEFAULT_ADAPTER_SUFFIX, adapter.path) for adapter in self.adapters
        )

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The ids clients choose from: the base model's, then each adapter's."""
        return (self.model_id, *(name for name, _ in self.served_adapters))

    @property
    def served_model_id(self) -> str:
        """The id of a request that names no model: the first adapter's, or the base model's in base-only mode."""
        return self.model_ids[1] if self.served_adapters else self.model_id

    def check_model_ids(self) -> None:
        """Raises ValueError naming the fix when two served models would share an id."""
        ids = self.model_ids
        duplicates = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if duplicates:
            raise ValueError(
                f"two served models are named {duplicates[0]!r} (the base model's folder name or an adapter's): "
                f"name each adapter once with --adapter NAME=PATH"
            )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def _prompt_template(text: str) -> str:
    # A literal "\n" (as typed in a shell or an environment variable) means a newline.
    template = text.replace("\\n", "\n")
    if template.count("{}") != 1:
        raise ValueError(text)
    return template


def parse_auth_username(text: str) -> str:
    """The username as given; raises argparse.ArgumentTypeError if basic auth could not carry it (the Pulumi
    program checks its config with it too)."""
    if not text or ":" in text or any(character.isspace() for character in text):
        # HTTP basic auth separates the username from the password with the first ":".
        raise argparse.ArgumentTypeError("must be non-empty, without ':' or whitespace (basic auth cannot carry them)")
    return text


MIN_PASSWORD_LENGTH = 12  # the Pulumi program requires it of accessPassword too


def _auth_password(text: str) -> str:
    # Most likely a broken secret reference: serving without a password would be the wrong way to fail.
    if not text:
        raise argparse.ArgumentTypeError("is set but empty: unset it to turn authentication off")
    if len(text) < MIN_PASSWORD_LENGTH:
        raise argparse.ArgumentTypeError(f"is shorter than {MIN_PASSWORD_LENGTH} characters: choose a longer password")
    return text


def parse_origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins, each scheme://host[:port] as a browser sends it in its Origin header.

    Raises argparse.ArgumentTypeError for one that is not; the Pulumi program checks its config with it too.
    """
    origins = tuple(origin.strip().rstrip("/") for origin in text.split(",") if origin.strip())
    for origin in origins:
        scheme, separator, host = origin.partition("://")
        if scheme not in ("http", "https") or not separator or not host or "/" in host:
            raise argparse.ArgumentTypeError(
                f"has {origin!r}: give origins as scheme://host[:port], e.g. https://chat.example.com"
            )
    return origins


_positive_int.__name__ = "positive integer"
parse_adapter.__name__ = "adapter, NAME=PATH or PATH"
_port.__name__ = "port (1-65535)"
_prompt_template.__name__ = "template with exactly one {} for the user's message"
parse_origins.__name__ = "comma-separated list of origins"


@dataclass(frozen=True)
class _Option:
    field: str
    flags: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None  # None: a boolean switch
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    repeatable: bool = False  # the flag may be given several times; its variable holds comma-separated values
    env_name: str | None = None  # None: named after the flag

    @property
    def env_var(self) -> str:
        """The environment variable named after the flag, e.g. --max-batch-size -> INFERENCE_MAX_BATCH_SIZE."""
        return ENV_PREFIX + (self.env_name or self.flags[0].removeprefix("--").replace("-", "_").upper())


_OPTIONS = (
    _Option("model_path", ("--model",), "base model folder (config, weights, tokenizer)", Path, metavar="PATH"),
    _Option(
        "adapters",
        ("--adapter",),
        "LoRA adapter folder saved by peft, as NAME=PATH (the model id clients use) or PATH (named after the base"
        f" model, with {DEFAULT_ADAPTER_SUFFIX}); repeat it to serve several adapters beside the base model, the"
        " first being the default (env: comma-separated)",
        parse_adapter,
        metavar="[NAME=]PATH",
        repeatable=True,
        env_name="ADAPTERS",
    ),
    _Option("base_only", ("--base-only",), "serve the base model without the adapter"),
    _Option("host", ("--host",), "address to listen on", str),
    _Option("port", ("--port",), "port for the UI and the API", _port),
    _Option(
        "dtype",
        ("--dtype",),
        "weights dtype; auto: bfloat16 on CUDA (float16 below compute capability 8.0, e.g. a T4), float32 on CPU",
        str,
        DTYPES,
    ),
    _Option("quantize_4bit", ("--quantize-4bit",), "load the base model in 4-bit (bitsandbytes; needs CUDA)"),
    _Option(
        "merge_adapter",
        ("--merge-adapter",),
        "merge the adapter into the weights for speed (default: on unless --quantize-4bit)",
    ),
    _Option(
        "max_concurrent_generations",
        ("--max-concurrent-generations",),
        "generations running at once; more wait in the UI's queue or get 429 from the API (default: --max-batch-size)",
        _positive_int,
    ),
    _Option(
        "max_generations_per_client",
        ("--max-generations-per-client",),
        "generations running at once for one client address; one more gets 429 from the API and a notice in the UI"
        " (default: no limit)",
        _positive_int,
    ),
    _Option("max_new_tokens_cap", ("--max-new-tokens-cap",), "upper bound on new tokens per reply", _positive_int),
    _Option(
        "prompt_template",
        ("--prompt-template",),
        "plain prompt template for adapters trained without a chat template, e.g. '### Question: {}\\n### Answer:'"
        " (default: the tokenizer's chat template)",
        _prompt_template,
        metavar="TEMPLATE",
    ),
    _Option(
        "load_with_mmap",
        ("--load-with-mmap",),
        "memory-map the weights instead of reading them sequentially (fast on local disks, slow on network shares)",
    ),
    _Option(
        "max_batch_size",
        ("--max-batch-size",),
        "generations sharing one decode step: the KV cache's slots (1 turns batching off; default: 64, fewer on a "
        "GPU whose free memory is small). When the slots' whole sequences do not fit in the cache's memory, the "
        "cache is paged: a request takes blocks for its prompt and token budget, and waits while too few are free",
        _positive_int,
    ),
    _Option(
        "max_batch_tokens",
        ("--max-batch-tokens",),
        "cap on the tokens in flight across a batch (prompt + max new tokens of each generation; default: none "
        "beyond the KV cache)",
        _positive_int,
    ),
    _Option(
        "max_sequence_tokens",
        ("--max-sequence-tokens",),
        "tokens of one sequence, prompt + reply (default: the model's context); longer prompts are refused",
        _positive_int,
    ),
    _Option(
        "kv_cache_tokens",
        ("--kv-cache-tokens",),
        "tokens the KV cache holds across all generations (default: as many as fit in the GPU's free memory after "
        "loading, less 10%% or at least 2 GiB of headroom; on the CPU in 2 GiB); at least --max-sequence-tokens, "
        "rounded up to whole blocks of 16",
        _positive_int,
    ),
    _Option(
        "prefill_chunk_tokens",
        ("--prefill-chunk-tokens",),
        "prompt tokens one step prefills while other generations stream (longer prompts are prefilled in chunks, so "
        "a running reply pauses at most for one chunk; default: 2048 on GPUs of compute capability 8.0 and later, "
        "512 on older GPUs, 256 on the CPU)",
        _positive_int,
    ),
    _Option(
        "cuda_graphs",
        ("--cuda-graphs",),
        "capture the decode step as CUDA graphs at start (on CUDA; if capture fails the app logs it and runs eager)",
    ),
    _Option(
        "auth_username",
        ("--auth-username",),
        "username for the UI and the API (with --auth-password)",
        parse_auth_username,
        metavar="NAME",
    ),
    _Option(
        "auth_password",
        ("--auth-password",),
        f"password for the UI and the API (bearer token or basic auth; at least {MIN_PASSWORD_LENGTH} characters);"
        " unset: no authentication",
        _auth_password,
        metavar="PASSWORD",
    ),
    _Option(
        "max_request_bytes",
        ("--max-request-bytes",),
        "largest request body accepted; a larger one gets 413",
        _positive_int,
        metavar="BYTES",
    ),
    _Option(
        "allowed_origins",
        ("--allowed-origins",),
        "other web origins whose pages may call the UI's and the API's routes from a browser, comma-separated"
        " (the app's own origin always may)",
        parse_origins,
        metavar="ORIGINS",
    ),
    _Option(
        "forwarded_allow_ips",
        ("--forwarded-allow-ips",),
        "comma-separated addresses or networks of proxies whose X-Forwarded-For/-Proto headers are believed for the"
        " client's address (the brake on password guessing) and scheme (HSTS); behind an ingress, its private"
        " networks (the client is then the last untrusted address, which the ingress wrote; '*' would believe the"
        " first, which the client wrote)",
        str,
        metavar="ADDRESSES",
    ),
    _Option(
        "demo",
        ("--demo",),
        "try the app without a model: build a small random-weight model and adapter once (replies are gibberish)"
        " and serve them on 127.0.0.1 (ignores --model, --adapter, --base-only and --host)",
    ),
    _Option(
        "demo_dir",
        ("--demo-dir",),
        "cache folder for --demo's model (default: ~/.cache/inference_app)",
        Path,
        metavar="PATH",
    ),
)

_RENAMED_ADAPTER_VARIABLE = ENV_PREFIX + "ADAPTER"  # before several adapters were served
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference_app",
        description="Serve a base model with its LoRA adapter: Gradio chat UI at /, OpenAI-compatible API at /v1.",
        epilog="Each option can also be set by the environment variable shown; the command line wins.",
    )
    defaults = Settings()
    for option in _OPTIONS:
        name = option.env_var
        default = getattr(defaults, option.field)
        env_value = environ.get(name)
        shown = ",".join(map(str, default)) if option.repeatable else default
        help_text = f"{option.help} (env {name}" + ("" if default is None else f"; default: {shown}") + ")"
        if option.type is None:
            if env_value is not None:
                default = _parse_bool(parser, name, env_value)
            # --x and --no-x, so the command line can override the environment either way.
            parser.add_argument(
                *option.flags, dest=option.field, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif option.repeatable:
            if env_value is not None:
                default = tuple(_parse_value(parser, name, item, option) for item in _comma_separated(env_value))
            # Given on the command line, the flag's values replace the environment's (and the default).
            parser.add_argument(
                *option.flags,
                dest=option.field,
                action="append",
                type=option.type,
                metavar=option.metavar,
                help=help_text,
            )
            parser.set_defaults(**{_repeatable_default(option): default})
        else:
            if env_value is not None:
                default = _parse_value(parser, name, env_value, option)
            parser.add_argument(
                *option.flags,
                dest=option.field,
                default=default,
                type=option.type,
                choices=option.choices,
                metavar=option.metavar,
                help=help_text,
            )
    return parser


def _comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _repeatable_default(option: _Option) -> str:
    """Where the parser keeps a repeatable option's default: apart, since argparse would append to it."""
    return f"{option.field}_default"


def _parse_bool(parser: argparse.ArgumentParser, name: str, value: str) -> bool:
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    parser.error(f"{name}={value!r}: use true or false")
    raise AssertionError("unreachable")  # parser.error exits


def _parse_value(parser: argparse.ArgumentParser, name: str, value: str, option: _Option) -> Any:
    assert option.type is not None
    try:
        parsed = option.type(value)
    except argparse.ArgumentTypeError as error:  # says what is wrong without echoing the value (maybe a secret)
        parser.error(f"{name} {error}")
    except ValueError:
        parser.error(f"{name}={value!r}: not a valid {getattr(option.type, '__name__', 'value')}")
    if option.choices is not None and parsed not in option.choices:
        parser.error(f"{name}={value!r}: choose from {', '.join(option.choices)}")
    return parsed


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the command line (default: sys.argv) and environment (default: os.environ).

    Invalid values exit with argparse's usage message naming the option (status 2).
    """
    environ = os.environ if environ is None else environ
    parser = _build_parser(environ)
    if _RENAMED_ADAPTER_VARIABLE in environ:  # silently ignored, it would serve the default folder instead
        parser.error(f"{_RENAMED_ADAPTER_VARIABLE} is now {env_var('adapters')} (NAME=PATH or PATH, comma-separated)")
    namespace = parser.parse_args(argv)
    for option in _OPTIONS:
        if option.repeatable:
            given = getattr(namespace, option.field)
            setattr(
                namespace,
                option.field,
                getattr(namespace, _repeatable_default(option)) if given is None else tuple(given),
            )
    settings = Settings(**{field.name: getattr(namespace, field.name) for field in fields(Settings)})
    try:
        settings.check_model_ids()
    except ValueError as error:
        parser.error(str(error))
    return settings


_OPTION_BY_FIELD = {option.field: option for option in _OPTIONS}


def env_var(field_name: str) -> str:
    """The environment variable that sets a Settings field, e.g. max_batch_size -> INFERENCE_MAX_BATCH_SIZE."""
    return _OPTION_BY_FIELD[field_name].env_var


def option_name(field_name: str) -> str:
    """How a message names the option of a Settings field, e.g. '--max-batch-size / INFERENCE_MAX_BATCH_SIZE'."""
    option = _OPTION_BY_FIELD[field_name]
    return f"{option.flags[0]} / {option.env_var}"


def environment_variables() -> dict[str, str]:
    """Each command-line flag and its environment variable (for docs and for whoever sets up the container)."""
    return {option.flags[0]: option.env_var for option in _OPTIONS}
