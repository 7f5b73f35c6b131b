"""The AI Toolkit's way of generating (its `inference/gradio_chat.py`, Phi-3 template), without the web server:
served over HTTP by bench/toolkit_baseline.py and called in process by bench/engine.py (see toolkit_baseline.py
for what it mirrors and the deliberate differences)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from threading import Thread
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

TOOLKIT_TEMPLATE = "<|user|>\n{}<|end|>\n<|assistant|>"


class ToolkitStyleModel:
    """The toolkit's generation: `model` is the unmerged PeftModel (or the base model when `using_adapter` is
    False); each `stream` runs `model.generate` in a new thread with a TextIteratorStreamer."""

    def __init__(self, model: Any, tokenizer: Any, using_adapter: bool, model_id: str, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.using_adapter = using_adapter
        self.model_id = model_id
        self.device = device

    @classmethod
    def load(cls, args: argparse.Namespace) -> ToolkitStyleModel:
        """Loads model and adapter from disk as the toolkit's script does."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(
            torch, args.dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model: Any = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device)
        model.resize_token_embeddings(len(tokenizer))  # as the toolkit does (a no-op for the bench models)
        if not args.base_only:
            model = PeftModel.from_pretrained(model, args.adapter)  # unmerged, as the toolkit serves it
        model_id = (args.model if args.base_only else args.adapter).name
        return cls(model, tokenizer, not args.base_only, model_id, device)

    def stream(self, user_text: str, max_new_tokens: int, temperature: float, top_p: float) -> Iterator[str | int]:
        """Yields the reply's text pieces as the streamer hands them over, then its token count."""
        prompt = TOOLKIT_TEMPLATE.format(user_text) if self.using_adapter else user_text
        model_inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, timeout=10.0, skip_prompt=True, skip_special_tokens=True)
        generate_kwargs = dict(
            model_inputs,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if temperature > 0:
            generate_kwargs.update(temperature=temperature, top_p=top_p)
        outputs: list[Any] = []
        thread = Thread(target=lambda: outputs.append(self.model.generate(**generate_kwargs)))
        thread.start()
        yield from streamer
        thread.join()
        yield int(outputs[0].shape[1] - model_inputs["input_ids"].shape[1]) if outputs else 0
