"""`python -m inference_app`: read the settings, start loading the model in the background, serve HTTP at once."""

from __future__ import annotations

import logging

from inference_app.generation import ModelService
from inference_app.settings import parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = ModelService(settings)
    # Loading runs in the background so that /health answers during a long load (the platform's startup probe).
    service.start_loading()
    from inference_app.server import serve  # imported after loading started: the web stack takes a while to import

    serve(settings, service)


if __name__ == "__main__":
    main()
