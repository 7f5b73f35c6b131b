"""`python -m inference_app`: read the settings, serve HTTP at once, load the model in the background."""

from __future__ import annotations

import logging

from inference_app.service import ModelService
from inference_app.settings import Settings, parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = _demo_service(settings) if settings.demo else ModelService(settings)
    from inference_app.server import serve

    # The model loads once the port listens (serve starts it): /health answers during a long load (the platform's
    # startup probe), and loading's heavy imports do not slow the web stack's.
    serve(service.settings, service)  # the demo's settings (its model, 127.0.0.1) when --demo


def _demo_service(settings: Settings) -> ModelService:
    """The service for the demo model, loaded like any other model after its build (unless cached)."""
    from inference_app.demo.demo_mode import (
        default_demo_dir,
        demo_banner,
        demo_folders,
        demo_settings,
        prepare_demo_model,
    )

    demo_dir = settings.demo_dir or default_demo_dir()
    folders = demo_folders(demo_dir)
    settings = demo_settings(settings, folders)
    print(demo_banner(settings, folders), flush=True)
    return ModelService(settings, prepare=lambda: prepare_demo_model(demo_dir))


if __name__ == "__main__":
    main()
