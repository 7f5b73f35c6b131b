"""The tests' and benchmarks' random-weight models: the app's own builder (inference_app.demo.random_model), which
`python -m inference_app --demo` uses too."""

from inference_app.demo.random_model import (
    LORA_TARGET_MODULES,
    SIZES,
    ModelFolders,
    adapter_folder,
    build_base_model,
    build_model_folders,
    build_tokenizer,
    generation_config,
    lora_config,
    model_folder,
    phi3_config,
)

__all__ = [
    "LORA_TARGET_MODULES",
    "SIZES",
    "ModelFolders",
    "adapter_folder",
    "build_base_model",
    "build_model_folders",
    "build_tokenizer",
    "generation_config",
    "lora_config",
    "model_folder",
    "phi3_config",
]
