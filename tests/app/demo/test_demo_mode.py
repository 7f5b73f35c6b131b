"""`python -m inference_app --demo`: builds the random-weight demo model once into its cache folder, serves it on
127.0.0.1 through the normal loading path, says what it is, and reuses the cache on the next start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import inference_app.demo.random_model
from inference_app.demo.demo_mode import DEMO_HOST, DEMO_MAX_NEW_TOKENS, default_demo_dir, demo_model_folders
from inference_app.demo.random_model import BUILT_MARK
from tests.app.server_harness import PROCESS_READY_TIMEOUT_S, app_process
from tests.server_process import app_command, free_port, start_server, stop_server, wait_for_status

pytestmark = pytest.mark.slow


def weight_files(demo_dir: Path) -> dict[Path, int]:
    """Each weights file of the demo model and adapter, with its modification time in nanoseconds."""
    return {path: path.stat().st_mtime_ns for path in demo_dir.rglob("*.safetensors")}


def test_demo_builds_its_model_once_and_serves_it_on_localhost(tmp_path: Path) -> None:
    demo_dir = tmp_path / "cache"
    # --model and --host are ignored: the demo serves its own model on 127.0.0.1 only.
    arguments = ["--demo", "--demo-dir", str(demo_dir), "--model", str(tmp_path / "none"), "--host", "0.0.0.0"]

    port = free_port()
    first_run = start_server(app_command(port, arguments), port, tmp_path / "first.log")
    try:
        # Listening comes first: /health answers before the model is even built, /ready says it is loading.
        wait_for_status(first_run, "/health", PROCESS_READY_TIMEOUT_S)
        assert "demo model built into" not in first_run.log_path.read_text()
        assert httpx.get(f"{first_run.url}/ready", timeout=10).json()["status"] == "loading"
        wait_for_status(first_run, "/ready", PROCESS_READY_TIMEOUT_S)
        url = first_run.url
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [model["id"] for model in models["data"]] == ["Phi-3-mini-4k-instruct-ft", "Phi-3-mini-4k-instruct"]
        completion = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 5
        # Without max_tokens the random model stops after the demo's short default. Greedy: a sampled reply of the
        # random model can draw its end token early.
        hi = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
        unbounded = httpx.post(f"{url}/v1/chat/completions", json=hi, timeout=60)
        assert unbounded.json()["usage"]["completion_tokens"] == DEMO_MAX_NEW_TOKENS
        assert httpx.get(f"{url}/", timeout=10).status_code == 200
        ui_config = httpx.get(f"{url}/config", timeout=10).text
    finally:
        stop_server(first_run)
    first_log = (tmp_path / "first.log").read_text()
    assert "DEMO: a small Phi-3-family model with RANDOM weights" in first_log
    assert "gibberish" in first_log
    assert f"Chat UI:     {url}/" in first_log
    assert f"demo model built into {demo_dir}" in first_log
    assert url.startswith(f"http://{DEMO_HOST}:")
    assert f"Uvicorn running on http://{DEMO_HOST}:" in first_log  # --host 0.0.0.0 was ignored
    # Served from the cache folder, by the settings every model is loaded with.
    folders, built_now = demo_model_folders(demo_dir)
    assert not built_now
    assert "This is a demo" in ui_config  # the page says so
    # The header names what is served, never where it lies on disk.
    assert "with the LoRA adapter `Phi-3-mini-4k-instruct-ft`" in ui_config
    assert str(folders.root) not in ui_config
    built = weight_files(demo_dir)
    assert len(built) == 2  # the base model's weights and the adapter's

    with app_process(arguments, tmp_path / "second.log") as url:
        completion = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
    second_log = (tmp_path / "second.log").read_text()
    assert f"demo model reused from {demo_dir}" in second_log
    assert weight_files(demo_dir) == built  # nothing rebuilt


def test_an_interrupted_build_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache logic alone (the real build is the test above): a build is reused only once it completed."""
    builds: list[Path] = []

    def build(root: Path, size: str, dtype: Any) -> None:  # stands in for the real builder: records where it built
        builds.append(root)
        (root / "weights").mkdir(parents=True)

    monkeypatch.setattr(inference_app.demo.random_model, "build_model_folders", build)
    folders, built_now = demo_model_folders(tmp_path)
    assert built_now and (folders.root / "weights").is_dir()
    assert demo_model_folders(tmp_path) == (folders, False)
    (folders.root / BUILT_MARK).unlink()  # as if the build had been cut short before its last step
    rebuilt, built_now = demo_model_folders(tmp_path)
    assert built_now and rebuilt == folders
    assert len(builds) == 2 and builds[0] != folders.root  # built beside, then moved into place
    assert sorted(path.name for path in tmp_path.iterdir()) == [folders.root.name]  # no half-built folder left


def test_the_default_cache_follows_xdg() -> None:
    assert default_demo_dir({"XDG_CACHE_HOME": "/var/cache/me"}) == Path("/var/cache/me/inference_app")
    assert default_demo_dir({}) == Path.home() / ".cache" / "inference_app"
