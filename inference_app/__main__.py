"""`python -m inference_app`: read the settings, start loading the model in the background, serve HTTP at once."""

from __future__ import annotations

import logging

from inference_app.service import ModelService
from inference_app.settings import Settings, parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.demo:
        settings = _with_demo_model(settings)
    service = ModelService(settings)
    # Loading runs in the background so that /health answers during a long load (the platform's startup probe).
    service.start_loading()
    from inference_app.server import serve  # imported after loading started: the web stack takes a while to import

    serve(settings, service)


def _with_demo_model(settings: Settings) -> Settings:
    """The settings serving the demo model (built now unless cached), loaded like any other model."""
    from inference_app.demo.demo_mode import default_demo_dir, demo_banner, demo_model_folders, demo_settings

    demo_dir = settings.demo_dir or default_demo_dir()
    logging.getLogger(__name__).info("preparing the demo model in %s", demo_dir)
    folders, built_now = demo_model_folders(demo_dir)
    settings = demo_settings(settings, folders)
    print(demo_banner(settings, folders, built_now), flush=True)
    return settings


if __name__ == "__main__":
    main()
