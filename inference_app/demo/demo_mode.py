"""`python -m inference_app --demo`: the app as deployed, serving a small random-weight model built on this machine.

The model, its tokenizer (with Phi-3's chat template) and a LoRA adapter are built once into a cache folder, in the
AI Toolkit's share layout, and then loaded through the app's normal loading path, like the real ones in Azure.
Nothing is downloaded: the weights are random, so the replies are gibberish; the point is the UI and the API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from inference_app.demo.share_layout import ModelFolders
from inference_app.settings import AdapterOption, Settings

logger = logging.getLogger(__name__)

DEMO_MODEL_SIZE = "small"  # Phi-3's vocabulary and proportions, scaled down to build in seconds and run on a CPU
DEMO_HOST = "127.0.0.1"
# The random model never writes its end token, so every reply runs to its token limit: without a small one, an API
# call that sets no max_tokens would run to the usual 1024 tokens (most of a minute on a CPU).
DEMO_MAX_NEW_TOKENS = 64
# The one folder the demo owns inside the cache folder (which may be any folder the user names): only it, and the
# build beside it, are ever replaced.
_DEMO_FOLDER = f"phi3-{DEMO_MODEL_SIZE}-random"


def default_demo_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """~/.cache/inference_app, or under $XDG_CACHE_HOME when set."""
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "inference_app"


def demo_folders(demo_dir: Path) -> ModelFolders:
    """Where the demo model lies in `demo_dir` (built or not)."""
    return ModelFolders.under(demo_dir / _DEMO_FOLDER)


def demo_model_folders(demo_dir: Path) -> tuple[ModelFolders, bool]:
    """The demo model in `demo_dir`, built unless an earlier build completed there; and whether it was built now."""
    from inference_app.demo.random_model import cached_model_folders  # torch: imported once the server listens

    return cached_model_folders(demo_folders(demo_dir).root, DEMO_MODEL_SIZE)


def prepare_demo_model(demo_dir: Path) -> None:
    """Builds the demo model unless it is cached (the first step of loading, while /health already answers)."""
    folders, built_now = demo_model_folders(demo_dir)
    logger.info("demo model %s %s", "built into" if built_now else "reused from", folders.root)


def demo_settings(settings: Settings, folders: ModelFolders) -> Settings:
    """`settings` serving the demo model and adapter, on this machine only, with short replies unless
    --max-new-tokens-cap says otherwise."""
    reply_tokens = DEMO_MAX_NEW_TOKENS if settings.max_new_tokens_cap == Settings.max_new_tokens_cap else None
    return dataclasses.replace(
        settings,
        model_path=folders.model_path,
        adapters=(AdapterOption(None, folders.adapter_path),),
        base_only=False,
        host=DEMO_HOST,
        max_new_tokens_cap=reply_tokens or settings.max_new_tokens_cap,
    )


def demo_banner(settings: Settings, folders: ModelFolders) -> str:
    cache = f"in {folders.root}, built there on first use"
    return "\n".join(
        [
            "",
            "=" * 78,
            "DEMO: a small Phi-3-family model with RANDOM weights and a random LoRA adapter",
            f"({cache}). Its replies are gibberish: this shows the app, not a model.",
            f"Replies stop after {settings.max_new_tokens_cap} tokens (--max-new-tokens-cap).",
            f"Chat UI:     http://{settings.host}:{settings.port}/",
            f"OpenAI API:  http://{settings.host}:{settings.port}/v1  (model id {settings.served_model_id!r})",
            "Stop with Ctrl+C.",
            "=" * 78,
            "",
        ]
    )
