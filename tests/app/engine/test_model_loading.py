"""Loading the base model and adapter from the AI Toolkit's folder layout, and every way it can go wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_app.engine.model_loading import ModelLoadError, load_model, resolve_dtype
from inference_app.service import GenerationChunk, ModelNotReadyError, ModelService
from inference_app.settings import AdapterOption, Settings
from tests.model_factory import (
    LORA_TARGET_MODULES,
    SIZES,
    ModelFolders,
    build_base_model,
    build_model_folders,
    model_folder,
)

Reply = Callable[..., list[GenerationChunk]]
PROMPT = "Tell me a story about a cat."


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_fixture_uses_the_toolkit_layout(model_folders: ModelFolders) -> None:
    root = model_folders.root
    assert model_folders.model_path == root / "model-cache" / "microsoft" / "Phi-3-mini-4k-instruct"
    assert model_folders.adapter_path == root / "models" / "qlora" / "qlora" / "gpu_model" / "adapter"
    adapter_config = json.loads((model_folders.adapter_path / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(LORA_TARGET_MODULES)
    assert adapter_config["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert json.loads((model_folders.model_path / "config.json").read_text())["model_type"] == "phi3"


def test_fixture_build_is_deterministic(model_folders: ModelFolders, tmp_path: Path) -> None:
    again = build_model_folders(tmp_path, size="tiny")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again.model_path / name).read_bytes() == (model_folders.model_path / name).read_bytes()
    weights = "adapter_model.safetensors"
    assert (again.adapter_path / weights).read_bytes() == (model_folders.adapter_path / weights).read_bytes()


def test_loads_model_and_adapter_with_info(start_service: Callable[..., ModelService]) -> None:
    service = start_service()
    assert service.status == "ready" and service.failure_reason is None
    assert service.info() == {
        "model_id": "Phi-3-mini-4k-instruct",
        "adapter_ids": ["Phi-3-mini-4k-instruct-ft"],
        "device": "cpu",
        "dtype": "float32",
        "context_length": SIZES["tiny"].context_length,
    }
    assert service.served_model_id() == "Phi-3-mini-4k-instruct-ft"
    assert set(service.load_timings) == {"weights", "adapter", "merge", "kv_cache_and_graphs", "warmup"}


def test_merged_and_unmerged_adapter_give_the_same_greedy_reply(
    start_service: Callable[..., ModelService], reply: Reply
) -> None:
    merged = text_of(reply(start_service(merge_adapter=True), PROMPT, max_new_tokens=30))
    unmerged = text_of(reply(start_service(merge_adapter=False), PROMPT, max_new_tokens=30))
    assert merged == unmerged
    assert len(merged) > 10


def test_base_only_differs_from_adapted(start_service: Callable[..., ModelService], reply: Reply) -> None:
    base = start_service(base_only=True)
    assert base.served_model_id() == "Phi-3-mini-4k-instruct"
    assert base.info()["adapter_ids"] == []
    assert text_of(reply(base, PROMPT, max_new_tokens=30)) != text_of(reply(start_service(), PROMPT, max_new_tokens=30))


def test_bfloat16_loads_on_cpu(start_service: Callable[..., ModelService], reply: Reply) -> None:
    service = start_service(dtype="bfloat16")
    assert service.info()["dtype"] == "bfloat16"
    assert reply(service, PROMPT, max_new_tokens=5)[-1].completion_tokens >= 1


def test_float16_loads_on_cpu_and_the_engine_matches_generate(
    start_service: Callable[..., ModelService], reply: Reply, tiny_settings: Settings
) -> None:
    """The dtype `auto` picks on a T4: the engine's path (cache, masks, sampling) in float16 gives generate's reply."""
    service = start_service(dtype="float16")
    assert service.info()["dtype"] == "float16"
    loaded = load_model(dataclasses.replace(tiny_settings, dtype="float16"))
    encoded: Any = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = encoded["input_ids"]
    with torch.inference_mode():
        output = loaded.model.generate(ids, max_new_tokens=20, do_sample=False)
    expected = loaded.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    assert text_of(reply(service, PROMPT, max_new_tokens=20)) == expected


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_is_float16_on_gpus_without_bfloat16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    """V100 (7.0) and T4 (7.5) have no bf16 hardware; A100 (8.0) and H100 (9.0) have."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16  # as set, whatever the GPU


def test_an_unmerged_adapter_stays_in_the_compute_dtype(tiny_settings: Settings) -> None:
    """As with --quantize-4bit (unmerged): peft's default would upcast the LoRA weights to float32."""
    loaded = load_model(dataclasses.replace(tiny_settings, dtype="bfloat16", merge_adapter=False))
    # The adapter's A and B, as the served model's LoRA layers hold them (row_adapters.RowLoraLinear).
    lora = {buffer.dtype for name, buffer in loaded.model.named_buffers() if name.endswith((".down", ".up"))}
    assert lora == {torch.bfloat16}


def test_memory_mapped_load_gives_the_same_reply(start_service: Callable[..., ModelService], reply: Reply) -> None:
    mapped = text_of(reply(start_service(load_with_mmap=True), PROMPT))
    assert mapped == text_of(reply(start_service(load_with_mmap=False), PROMPT))


# ---- every bad case fails with one line naming the path and the option to fix ----


def _copy_adapter(model_folders: ModelFolders, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_folders.adapter_path, tmp_path / "adapter-copy"))


def _bad_model_folder(case: str, model_folders: ModelFolders, tmp_path: Path) -> Path:
    if case == "missing":
        return tmp_path / "no-such-model"
    if case == "placeholder":
        return Path("<path-to-base-model>")
    if case == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if case == "file":
        (tmp_path / "model.txt").write_text("not a folder")
        return tmp_path / "model.txt"
    assert case == "not-a-model"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no weights here")
    return tmp_path / "notes"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("placeholder", "looks like a placeholder"),
        ("empty", "is empty"),
        ("file", "is not a folder"),
        ("not-a-model", "has no config.json and weights"),
    ],
)
def test_bad_model_path_names_path_and_option(
    case: str, message: str, model_folders: ModelFolders, tmp_path: Path
) -> None:
    path = _bad_model_folder(case, model_folders, tmp_path)
    settings = Settings(model_path=path, adapters=(AdapterOption(None, model_folders.adapter_path),))
    with pytest.raises(ModelLoadError) as error:
        load_model(settings)
    _assert_one_clear_line(str(error.value), str(path), message, "--model / INFERENCE_MODEL")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("placeholder", "looks like a placeholder"),
        ("empty", "is empty"),
        ("not-an-adapter", "has no adapter_config.json and adapter weights"),
    ],
)
def test_bad_adapter_path_names_path_and_option(
    case: str, message: str, model_folders: ModelFolders, tmp_path: Path
) -> None:
    if case == "not-an-adapter":
        path = _copy_adapter(model_folders, tmp_path)
        (path / "adapter_config.json").unlink()
    else:
        path = _bad_model_folder(case, model_folders, tmp_path)
    settings = Settings(model_path=model_folders.model_path, adapters=(AdapterOption(None, path),))
    with pytest.raises(ModelLoadError) as error:
        load_model(settings)
    _assert_one_clear_line(str(error.value), str(path), message, "--adapter / INFERENCE_ADAPTERS")


def test_adapter_for_another_base_model_is_refused(model_folders: ModelFolders, tmp_path: Path) -> None:
    adapter = _copy_adapter(model_folders, tmp_path)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "microsoft/Phi-3-medium-4k-instruct"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        load_model(Settings(model_path=model_folders.model_path, adapters=(AdapterOption(None, adapter),)))
    _assert_one_clear_line(str(error.value), str(adapter), "'microsoft/Phi-3-medium-4k-instruct'", "--model")


def test_adapter_whose_shapes_do_not_fit_is_refused(model_folders: ModelFolders, tmp_path: Path) -> None:
    # Same name as the adapter's base, different hidden size: only the weights' shapes tell them apart.
    wider_base = model_folder(tmp_path)
    build_base_model(wider_base, size=dataclasses.replace(SIZES["tiny"], hidden_size=96))
    with pytest.raises(ModelLoadError) as error:
        load_model(Settings(model_path=wider_base, adapters=(AdapterOption(None, model_folders.adapter_path),)))
    _assert_one_clear_line(
        str(error.value), str(model_folders.adapter_path), "size mismatch", "--adapter / INFERENCE_ADAPTERS"
    )


def _cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGED_FILES: dict[str, tuple[str, Callable[[Path], object], str, str]] = {
    # id: (file in the model or adapter folder, what is done to it, the problem named, the option named)
    "weights-cut-short": ("model/model.safetensors", _cut_in_half, "is cut short", "--model / INFERENCE_MODEL"),
    "weights-header-cut": (
        "model/model.safetensors",
        lambda file: file.write_bytes(file.read_bytes()[:100]),
        "is cut short or not a safetensors file",
        "--model / INFERENCE_MODEL",
    ),
    "config-not-json": (
        "model/config.json",
        lambda file: file.write_text('{"model_type": "phi3", '),
        "config.json is unreadable",
        "--model / INFERENCE_MODEL",
    ),
    "adapter-weights-junk": (
        "adapter/adapter_model.safetensors",
        lambda file: file.write_bytes(b"junk" * 1000),
        "is cut short or not a safetensors file",
        "--adapter / INFERENCE_ADAPTER",
    ),
    "adapter-weights-cut-short": (
        "adapter/adapter_model.safetensors",
        _cut_in_half,
        "is cut short",
        "--adapter / INFERENCE_ADAPTER",
    ),
}


@pytest.mark.parametrize(("file", "damage", "problem", "option"), DAMAGED_FILES.values(), ids=DAMAGED_FILES.keys())
def test_a_damaged_file_is_named_with_the_fix(
    model_folders: ModelFolders,
    tmp_path: Path,
    file: str,
    damage: Callable[[Path], object],
    problem: str,
    option: str,
) -> None:
    """An interrupted copy or a junk file gave "unexpected error … SafetensorError: …" without the file, and a
    broken config.json was blamed on the tokenizer."""
    folders = {
        "model": Path(shutil.copytree(model_folders.model_path, tmp_path / "Phi-3-mini-4k-instruct")),
        "adapter": _copy_adapter(model_folders, tmp_path),
    }
    folder, name = file.split("/")
    damage(folders[folder] / name)
    service = ModelService(Settings(model_path=folders["model"], adapters=(AdapterOption(None, folders["adapter"]),)))
    service.start_loading()
    assert service.wait_until_loaded(30) == "failed"
    assert service.failure_reason is not None
    _assert_one_clear_line(service.failure_reason, str(folders[folder] / name), problem, option)
    assert "copy" in service.failure_reason


def test_base_only_does_not_need_an_adapter(model_folders: ModelFolders, tmp_path: Path) -> None:
    loaded = load_model(
        Settings(
            model_path=model_folders.model_path, adapters=(AdapterOption(None, tmp_path / "none"),), base_only=True
        )
    )
    assert loaded.model_ids == ("Phi-3-mini-4k-instruct",) and loaded.row_models is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_four_bit_without_cuda_is_refused(model_folders: ModelFolders) -> None:
    settings = Settings(
        model_path=model_folders.model_path,
        adapters=(AdapterOption(None, model_folders.adapter_path),),
        quantize_4bit=True,
    )
    with pytest.raises(ModelLoadError) as error:
        load_model(settings)
    _assert_one_clear_line(str(error.value), "", "needs a CUDA GPU", "--quantize-4bit / INFERENCE_QUANTIZE_4BIT")


def test_service_reports_the_failure_and_never_becomes_ready(tmp_path: Path, model_folders: ModelFolders) -> None:
    missing = tmp_path / "not-mounted"
    service = ModelService(Settings(model_path=missing, adapters=(AdapterOption(None, model_folders.adapter_path),)))
    assert service.status == "loading"
    with pytest.raises(ModelNotReadyError, match="still loading"):
        service.info()
    service.start_loading()
    assert service.wait_until_loaded(30) == "failed"
    assert service.failure_reason is not None
    _assert_one_clear_line(service.failure_reason, str(missing), "does not exist", "INFERENCE_MODEL")
    with pytest.raises(ModelNotReadyError, match="does not exist"):
        service.info()
    assert service.served_model_id() == "not-mounted-ft"  # known before loading: named after the base's folder


def _assert_one_clear_line(message: str, path: str, problem: str, option: str) -> None:
    assert "\n" not in message
    assert path in message
    assert problem in message
    assert option in message
