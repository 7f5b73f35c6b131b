"""The tests' tiny models: the app's own random-model builder (inference_app.random_model), which the demo uses too."""

from inference_app.random_model import (
    LORA_TARGET_MODULES,
    SIZES,
    ModelFolders,
    adapter_folder,
    build_base_model,
    build_model_folders,
    model_folder,
)

__all__ = [
    "LORA_TARGET_MODULES",
    "SIZES",
    "ModelFolders",
    "adapter_folder",
    "build_base_model",
    "build_model_folders",
    "model_folder",
]
