"""Loads the base model, its tokenizer and the LoRA adapter from disk (the Azure Files share in Azure).

Every mistake a user can make (wrong or placeholder path, empty folder, an adapter for another base model, a file
cut short by an interrupted copy or not what its name says) becomes a ModelLoadError with one line naming the path
and what to do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from inference_app.engine.row_adapters import RowModels, serve_adapters
from inference_app.settings import Settings, option_name

logger = logging.getLogger(__name__)

MODEL_OPTION = option_name("model_path")
ADAPTER_OPTION = option_name("adapters")
QUANTIZE_OPTION = option_name("quantize_4bit")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# safetensors' own limit on a file's JSON header; a larger length field means the file is something else.
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
_PLACEHOLDER_MARKS = ("<", ">", "{{", "}}", "$")


class ModelLoadError(Exception):
    """The model or adapter cannot be loaded; the message is one line naming the path and the option to fix."""


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM; with adapters, its LoRA layers are RowLoraLinear
    tokenizer: PreTrainedTokenizerBase
    model_ids: tuple[str, ...]  # the served models: the base model, then each adapter (row_adapters.RowModels' order)
    default_model: int  # the one a request naming none runs: the first adapter, or the base model without adapters
    row_models: RowModels | None  # which model each row runs; None when only the base model is served
    device: str
    dtype: str
    context_length: int
    timings: dict[str, float]  # seconds spent in each loading phase (weights, adapter, merge)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def load_model(settings: Settings) -> LoadedModel:
    _check_model_folder(settings.model_path)
    adapters = settings.served_adapters
    for _, adapter_path in adapters:
        _check_adapter_folder(adapter_path, settings.model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(settings.dtype, device)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    tokenizer = _load_tokenizer(settings.model_path)
    model = _load_base_model(settings, device, dtype)
    timings["weights"] = time.perf_counter() - started

    row_models = None
    if adapters:
        started = time.perf_counter()
        # peft's own names for them: a served name may hold a "." (module names cannot).
        peft_names = [f"adapter_{index}" for index in range(len(adapters))]
        for peft_name, (_, adapter_path) in zip(peft_names, adapters, strict=True):
            model = _load_adapter(model, peft_name, adapter_path, settings.model_path)
        timings["adapter"] = time.perf_counter() - started
        started = time.perf_counter()
        model, row_models = serve_adapters(model, peft_names, settings.should_merge_adapter)
        timings["merge"] = time.perf_counter() - started
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_ids=settings.model_ids,
        default_model=settings.model_ids.index(settings.served_model_id),
        row_models=row_models,
        device=device,
        dtype="4-bit (nf4)" if settings.quantize_4bit else str(dtype).removeprefix("torch."),
        context_length=int(model.config.max_position_embeddings),
        timings=timings,
    )


def _check_folder(path: Path, option: str, what: str) -> None:
    text = str(path)
    if not text.strip() or any(mark in text for mark in _PLACEHOLDER_MARKS):
        raise ModelLoadError(f"{what} path {text!r} looks like a placeholder: set {option} to the real folder")
    if not path.exists():
        raise ModelLoadError(f"{what} folder {path} does not exist: set {option} to the folder (is the share mounted?)")
    if not path.is_dir():
        raise ModelLoadError(f"{what} path {path} is not a folder: set {option} to the folder that holds it")
    if not any(path.iterdir()):
        raise ModelLoadError(f"{what} folder {path} is empty: copy the files there or set {option} to another folder")


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def _check_model_folder(path: Path) -> None:
    _check_folder(path, MODEL_OPTION, "base model")
    config_file = path / "config.json"
    if not config_file.is_file() or not _has_weights(path):
        raise ModelLoadError(
            f"base model folder {path} has no config.json and weights (*.safetensors): "
            f"set {MODEL_OPTION} to a Hugging Face model folder"
        )
    try:
        json.loads(config_file.read_text())
    except (OSError, ValueError) as error:  # read by the tokenizer first, which would blame itself
        raise ModelLoadError(
            f"model config {config_file} is unreadable ({error}): copy it again from the base model's download, "
            f"or set {MODEL_OPTION} to a complete model folder"
        ) from None
    _check_safetensors_files(
        path, f"copy it again from the base model's download (or set {MODEL_OPTION} to a complete copy)"
    )


def _check_safetensors_files(folder: Path, fix: str) -> None:
    """Refuses a *.safetensors file cut short (an interrupted copy) or not in the format, naming it; reads only the
    headers. safetensors' own errors name neither the file nor the problem a user can act on."""
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as stream:
            length_field = stream.read(8)
            header_length = int.from_bytes(length_field, "little")
            if len(length_field) < 8 or not 2 <= header_length <= min(size - 8, _MAX_SAFETENSORS_HEADER_BYTES):
                raise ModelLoadError(f"weights file {file} is cut short or not a safetensors file: {fix}")
            try:
                header = json.loads(stream.read(header_length))
                data_end = max(
                    (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0
                )
            except (ValueError, TypeError, KeyError, IndexError):
                raise ModelLoadError(f"weights file {file} has a damaged header: {fix}") from None
        if 8 + header_length + data_end > size:
            raise ModelLoadError(
                f"weights file {file} is cut short ({size} bytes of the {8 + header_length + data_end} its header "
                f"describes): {fix}"
            )


def _check_adapter_folder(adapter_path: Path, model_path: Path) -> None:
    _check_folder(adapter_path, ADAPTER_OPTION, "adapter")
    config_file = adapter_path / "adapter_config.json"
    if not config_file.is_file() or not _has_weights(adapter_path):
        raise ModelLoadError(
            f"adapter folder {adapter_path} has no adapter_config.json and adapter weights: "
            f"set {ADAPTER_OPTION} to the folder peft saved (or use --base-only)"
        )
    try:
        base_name = json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"adapter config {config_file} is unreadable ({error}): fix or replace the adapter"
        ) from None
    _check_safetensors_files(adapter_path, f"copy the adapter again (or set {ADAPTER_OPTION} to a complete copy)")
    # The toolkit writes the hub name (microsoft/Phi-3-mini-4k-instruct); the share holds it under that name.
    if base_name and Path(base_name).name.lower() != model_path.name.lower():
        raise ModelLoadError(
            f"adapter {adapter_path} was trained on base model {base_name!r}, not {model_path.name!r}: "
            f"set {MODEL_OPTION} to that base model's folder or {ADAPTER_OPTION} to a matching adapter "
            f"(or correct base_model_name_or_path in {config_file.name} if the folder was only renamed)"
        )


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device != "cuda":
        return torch.float32
    # Below compute capability 8.0 (T4, V100) there is no bf16 hardware: SDPA would fall back to its math kernel in
    # fp32 (slow, and large prefills run out of memory). float16 there, as vLLM's `auto` does.
    major, _minor = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def _load_tokenizer(model_path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"no usable tokenizer in {model_path} ({_first_line(error)}): set {MODEL_OPTION} to a folder with one"
        ) from None


def _load_base_model(settings: Settings, device: str, dtype: torch.dtype) -> Any:
    options: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": "sdpa",
        # Over SMB (Azure Files) memory-mapping turns into many small page reads; one sequential read is much faster.
        "disable_mmap": not settings.load_with_mmap,
    }
    if device == "cuda":
        options["device_map"] = "cuda"
    if settings.quantize_4bit:
        options["quantization_config"] = _four_bit_config(device, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(settings.model_path, **options)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(
            f"cannot load base model from {settings.model_path} ({_first_line(error)}): "
            f"set {MODEL_OPTION} to a Hugging Face causal LM folder"
        ) from None


def _four_bit_config(device: str, dtype: torch.dtype) -> Any:
    if device != "cuda":
        raise ModelLoadError(f"{QUANTIZE_OPTION} needs a CUDA GPU and none was found: turn it off")
    try:
        import bitsandbytes  # noqa: F401  (only its presence matters here)
    except ImportError:
        raise ModelLoadError(
            f"{QUANTIZE_OPTION} needs the bitsandbytes package: install it or turn the option off"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def _load_adapter(model: Any, name: str, adapter_path: Path, model_path: Path) -> Any:
    """`model` (the base, or a PeftModel holding the adapters loaded before) with this adapter too."""
    try:
        # peft upcasts an adapter to float32 by default (autocast_adapter_dtype); unmerged (4-bit, or a served
        # adapter beside the merged one), every LoRA module would then compute in float32 beside bf16/fp16
        # activations. Keep it in the compute dtype.
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_path, adapter_name=name, is_trainable=False, autocast_adapter_dtype=False)
            return model
        return PeftModel.from_pretrained(
            model, adapter_path, adapter_name=name, is_trainable=False, autocast_adapter_dtype=False
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise ModelLoadError(
            f"adapter {adapter_path} does not fit base model {model_path} ({_first_line(error)}): "
            f"set {ADAPTER_OPTION} to an adapter trained on this base, or {MODEL_OPTION} to its base"
        ) from None


def _first_line(error: BaseException) -> str:
    """The informative line of a library error: a size mismatch when there is one, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    mismatches = [line for line in lines if "size mismatch" in line]
    return (mismatches or lines)[0][:300]
