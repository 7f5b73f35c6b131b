"""`python -m inference_app --demo`: the app as deployed, serving a small random-weight model built on this machine.

The model, its tokenizer (with Phi-3's chat template) and a LoRA adapter are built once into a cache folder, in the
AI Toolkit's share layout, and then loaded through the app's normal loading path, like the real ones in Azure.
Nothing is downloaded: the weights are random, so the replies are gibberish; the point is the UI and the API.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from inference_app.demo.random_model import ModelFolders, cached_model_folders
from inference_app.settings import Settings

DEMO_MODEL_SIZE = "small"  # Phi-3's vocabulary and proportions, scaled down to build in seconds and run on a CPU
DEMO_HOST = "127.0.0.1"
# The one folder the demo owns inside the cache folder (which may be any folder the user names): only it, and the
# build beside it, are ever replaced.
_DEMO_FOLDER = f"phi3-{DEMO_MODEL_SIZE}-random"


def default_demo_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """~/.cache/inference_app, or under $XDG_CACHE_HOME when set."""
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "inference_app"


def demo_model_folders(demo_dir: Path) -> tuple[ModelFolders, bool]:
    """The demo model in `demo_dir`, built unless an earlier build completed there; and whether it was built now."""
    return cached_model_folders(demo_dir / _DEMO_FOLDER, DEMO_MODEL_SIZE)


def demo_settings(settings: Settings, folders: ModelFolders) -> Settings:
    """`settings` serving the demo model and adapter, on this machine only."""
    return dataclasses.replace(
        settings, model_path=folders.model_path, adapter_path=folders.adapter_path, base_only=False, host=DEMO_HOST
    )


def demo_banner(settings: Settings, folders: ModelFolders, built_now: bool) -> str:
    cache = f"built into {folders.root}" if built_now else f"reused from {folders.root}"
    return "\n".join(
        [
            "",
            "=" * 78,
            "DEMO: a small Phi-3-family model with RANDOM weights and a random LoRA adapter",
            f"({cache}). Its replies are gibberish: this shows the app, not a model.",
            f"Chat UI:     http://{settings.host}:{settings.port}/",
            f"OpenAI API:  http://{settings.host}:{settings.port}/v1  (model id {settings.served_model_id!r})",
            "Stop with Ctrl+C.",
            "=" * 78,
            "",
        ]
    )
