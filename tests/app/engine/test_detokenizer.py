"""Tokens to text: the incremental detokenizer gives the exact text without redecoding the reply, and the stop
matcher never lets a stop string (or its start) out."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from tests.model_factory import ModelFolders


def test_stop_matcher_holds_back_partial_stops() -> None:
    matcher = StopMatcher(("END", "</s>"))
    assert matcher.push("Hello E") == ("Hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("X <") == ("ENX ", False)
    assert matcher.push("/s") == ("", False)
    assert matcher.push("> after") == ("", True)
    unfinished = StopMatcher(("END",))
    assert unfinished.push("the EN") == ("the ", False)
    assert unfinished.flush() == "EN"


class _CountingTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest_decode = 0

    def decode(self, ids: list[int], **options: Any) -> str:
        self.longest_decode = max(self.longest_decode, len(ids))
        return str(self.tokenizer.decode(ids, **options))


def test_detokenizer_streams_exact_text_without_redecoding_the_reply(model_folders: ModelFolders) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_folders.model_path)
    text = "Héllo wörld, 猫 and 🐱 — " * 20  # multi-byte characters split over several byte-level tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = _CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(pieces) + detokenizer.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert len(ids) > 200
    assert counting.longest_decode <= 5
    # The tokenizer itself takes the fast path (its Rust decode directly): the same text.
    direct = IncrementalDetokenizer(tokenizer)
    assert "".join(direct.push(token) for token in ids) + direct.flush() == text
