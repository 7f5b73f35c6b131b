"""The AI Toolkit's way of serving a fine-tuned model, reproduced as the baseline of bench/concurrency.py.

It mirrors the toolkit's `inference/gradio_chat.py` (Phi-3 template): the base model wrapped in an unmerged
`PeftModel`; per request, the last user message goes into the template `<|user|>\\n{}<|end|>\\n<|assistant|>`, a
`TextIteratorStreamer(timeout=10., skip_prompt=True, skip_special_tokens=True)` is created and
`model.generate` runs in a new thread with `eos_token_id=tokenizer.eos_token_id`; the request streams whatever the
streamer yields. No batching, no limit on concurrent generations, and a client that hangs up does not stop its
generation thread. It is served over the same OpenAI-style streaming route as the app so the same client measures
both.

Deliberate differences, each in the baseline's favour or neutral:
- no 4-bit quantization (the toolkit loads nf4 on CUDA): bitsandbytes needs CUDA, and 4-bit decodes slower;
  the baseline uses the same dtype as the app;
- the reply's token count is reported in a final `usage` chunk (the toolkit reports none) so that tokens/s is
  counted exactly, as for the app.

Run: python -m bench.toolkit_baseline --model PATH --adapter PATH [--host 127.0.0.1] [--port 7861]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.toolkit_model import ToolkitStyleModel


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--base-only", action="store_true", help="like the toolkit's --baseonly")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    return parser.parse_args(argv)


def build_app(toolkit_model: ToolkitStyleModel) -> FastAPI:
    app = FastAPI(title="AI Toolkit-style baseline")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready", "model_id": toolkit_model.model_id}  # the model loads before serving

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await request.json()
        user_messages = [message["content"] for message in body.get("messages", []) if message.get("role") == "user"]
        if not user_messages:
            return JSONResponse({"error": {"message": "no user message", "type": "invalid_request_error"}}, 400)
        pieces = toolkit_model.stream(
            user_messages[-1],  # the toolkit reads only the last user message
            int(body.get("max_tokens") or 250),
            float(body.get("temperature", 0.8)),
            float(body.get("top_p", 0.95)),
        )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # A sync generator: Starlette iterates it in its thread pool, one blocking streamer per request.
        return StreamingResponse(_sse(pieces, toolkit_model.model_id, include_usage), media_type="text/event-stream")

    return app


def _sse(pieces: Iterator[str | int], model_id: str, include_usage: bool) -> Iterator[str]:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(delta: dict[str, str] | None, finish_reason: str | None, **extra: Any) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta is not None else [],
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant"}, None)
    completion_tokens = 0
    for piece in pieces:
        if isinstance(piece, int):
            completion_tokens = piece
        elif piece:
            yield event({"content": piece}, None)
    yield event({}, "stop")
    if include_usage:
        usage = {"prompt_tokens": None, "completion_tokens": completion_tokens, "total_tokens": None}
        yield event(None, None, usage=usage)
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    print("Running on device:", "cuda" if torch.cuda.is_available() else "cpu", flush=True)
    print("CPU threads:", torch.get_num_threads(), flush=True)
    toolkit_model = ToolkitStyleModel.load(args)
    print(f"Model {args.model} loaded successfully", flush=True)
    uvicorn.run(build_app(toolkit_model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
