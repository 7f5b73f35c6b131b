"""Driving a ModelService directly (no HTTP), for the fixtures in conftest.py and the test modules alike."""

from __future__ import annotations

import asyncio

from inference_app.service import GenerationChunk, ModelService, SamplingParams


def collect_chunks(
    service: ModelService,
    messages: list[dict[str, str]],
    params: SamplingParams,
    *,
    wait: bool = True,
    model: str | None = None,
) -> list[GenerationChunk]:
    """Every chunk of one streamed reply (of `model`; None: the default one)."""

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in service.stream_chat(messages, params, wait=wait, model=model)]

    return asyncio.run(collect())
