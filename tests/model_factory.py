"""The tests' and benchmarks' random-weight models: the app's own builder (inference_app.demo.random_model), in the
share's layout; `python -m inference_app --demo` uses it too."""

from inference_app.demo.random_model import (
    LORA_TARGET_MODULES,
    SIZES,
    build_adapter,
    build_base_model,
    build_model_folders,
    build_tokenizer,
    generation_config,
    lora_config,
    phi3_config,
)
from inference_app.demo.share_layout import ModelFolders, adapter_folder, model_folder

__all__ = [
    "LORA_TARGET_MODULES",
    "SIZES",
    "ModelFolders",
    "adapter_folder",
    "build_adapter",
    "build_base_model",
    "build_model_folders",
    "build_tokenizer",
    "generation_config",
    "lora_config",
    "model_folder",
    "phi3_config",
]
