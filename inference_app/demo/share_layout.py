"""Where the AI Toolkit's share keeps the base model and the adapter (the layout the random models are built in).

No torch here: `python -m inference_app --demo` names its folders before anything heavy is imported.

    <root>/model-cache/microsoft/<name>            base model + tokenizer
    <root>/models/qlora/qlora/gpu_model/adapter     LoRA adapter (peft)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_MODEL_NAME = "Phi-3-mini-4k-instruct"


@dataclass(frozen=True)
class ModelFolders:
    root: Path
    model_path: Path
    adapter_path: Path

    @classmethod
    def under(cls, root: Path) -> ModelFolders:
        return cls(root=root, model_path=model_folder(root), adapter_path=adapter_folder(root))


def model_folder(root: Path, name: str = BASE_MODEL_NAME) -> Path:
    return root / "model-cache" / "microsoft" / name


def adapter_folder(root: Path) -> Path:
    return root / "models" / "qlora" / "qlora" / "gpu_model" / "adapter"
