"""The model on the device: the running batch's tensors, the prefill and decode forward passes over the KV cache, and
sampling (inference_app.engine.sampler). On a GPU the decode step replays a CUDA graph
(inference_app.engine.cuda_graphs).

Rows are KV-cache slots: a decode step runs over slots 0..width-1, each row at its own position (no left padding);
a row without a decoding request below the width (a free slot, or one whose prompt is still being prefilled in
chunks) computes harmlessly and writes to the scratch block. The next input token and
position of every row stay on the device, so a step copies nothing from the host, and its new tokens come back in
one device-to-host copy.
"""

from __future__ import annotations

from typing import Any

import torch

from inference_app.engine.cuda_graphs import SHORTEST_LENGTH_BUCKET, DecodeRunner, GraphDecoder, make_decoder
from inference_app.engine.kv_cache import KVCache
from inference_app.engine.request import EngineRequest
from inference_app.engine.row_adapters import RowModels
from inference_app.engine.sampler import BatchSampler, SampledTokens
from inference_app.engine.types import TokenLogprobs

# A step's new tokens, and their log probabilities (None for rows that did not ask; None: no row asked).
StepTokens = tuple[list[int], list[TokenLogprobs | None] | None]

CPU_PREFILL_CHUNK_TOKENS = 256
GPU_PREFILL_CHUNK_TOKENS = 2048
OLD_GPU_PREFILL_CHUNK_TOKENS = 512  # below compute capability 8.0


class DecodeBatch:
    """Per slot, on the device: the next input token, its position and whether a request holds the slot."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self._next_positions: dict[int, int] = {}  # host copy of `positions` for the slots in use
        self._sampled: set[int] = set()  # slots whose request samples (not greedy)
        self._device = device

    def __len__(self) -> int:
        return len(self._next_positions)

    @property
    def width(self) -> int:
        """Rows a decode step must cover: up to the highest slot in use."""
        return max(self._next_positions) + 1

    @property
    def length(self) -> int:
        """Key positions a decode step must attend to: up to the furthest row's new token."""
        return max(self._next_positions.values()) + 1

    @property
    def any_sampled(self) -> bool:
        return bool(self._sampled)

    def add(self, slots: list[int], tokens: torch.Tensor, positions: list[int], sampled: list[bool]) -> None:
        index = torch.tensor(slots, device=self._device)
        self.tokens[index] = tokens
        self.positions[index] = torch.tensor(positions, device=self._device)
        self.active[index] = True
        for slot, position, samples in zip(slots, positions, sampled, strict=True):
            self._next_positions[slot] = position
            if samples:
                self._sampled.add(slot)

    def advance(self, new_tokens: torch.Tensor, width: int) -> None:
        """The rows in use take their new token as the next input, one position further (on the device)."""
        active = self.active[:width]
        self.tokens[:width] = torch.where(active, new_tokens, 0)
        self.positions[:width] += active
        for slot in self._next_positions:
            self._next_positions[slot] += 1

    def remove(self, slots: list[int]) -> None:
        """Frees the slots: their rows go on computing (when below the width) at position 0 of a free slot."""
        if not slots:
            return
        index = torch.tensor(slots, device=self._device)
        self.tokens[index] = 0
        self.positions[index] = 0
        self.active[index] = False
        for slot in slots:
            self._next_positions.pop(slot, None)  # a request that failed in its prefill never joined
            self._sampled.discard(slot)


class ModelRunner:
    """Runs the model for the engine loop: prefill of joining requests, one decode step over the batch."""

    def __init__(
        self,
        model: Any,
        cache: KVCache,
        device: torch.device,
        cuda_graphs: bool,
        row_models: RowModels | None = None,
    ):
        self._model = model
        self.cache = cache
        self._device = device
        slots = cache.plan.slots
        self.batch = DecodeBatch(slots, device)
        self._sampler = BatchSampler(slots, int(model.config.vocab_size), device)
        self._slot_index = torch.arange(slots, device=device)  # 0..slots-1
        # Several served models: which one each row runs (row_adapters); decode steps whose rows all run the merged
        # weights take `decoder`, the others `correcting_decoder`, which computes the per-row LoRA corrections.
        self._row_models = row_models
        if row_models is not None:
            row_models.allocate(slots, device, model.dtype)
        use_graphs = cuda_graphs and cuda_graphs_supported(device)
        with torch.inference_mode():
            self.decoder = self._make_decoder(use_graphs, correcting=False)
            # Graphs for the corrections only when the plain step's were captured (one fallback, one log line).
            graphs_captured = isinstance(self.decoder, GraphDecoder)
            self.correcting_decoder = (
                None if row_models is None else self._make_decoder(graphs_captured, correcting=True)
            )

    def prefill(self, requests: list[EngineRequest]) -> StepTokens:
        """Runs the prompts together (right-padded) into their slots and samples each first token; the rows join the
        decode batch. Returns the first tokens (and log probabilities, for the rows that asked)."""
        slots = [_slot(request) for request in requests]
        self._take_slots(slots, requests)
        first = self._prefill_forward(slots, requests)
        self._join_batch(slots, requests, first.tokens)
        return list(first.tokens.tolist()), first.logprobs

    def prefill_chunk(self, request: EngineRequest, start: int, length: int) -> StepTokens | None:
        """Runs prompt positions start..start+length-1 of one request into its slot, attending to the earlier ones
        there. The last chunk samples the first token (returned, as prefill's) and the row joins the decode batch;
        else None."""
        slot = _slot(request)
        if start == 0:
            self._take_slots([slot], [request])
        end = start + length
        mask = self.cache.prepare_chunk(slot, start, length)
        self._select_models([slot], [request])
        logits = self._model(
            input_ids=torch.tensor([request.prompt_ids[start:end]], device=self._device),
            position_ids=torch.arange(start, end, device=self._device)[None],
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if end < len(request.prompt_ids):
            return None
        positions = torch.tensor([end - 1], device=self._device)
        first = self._sampler.sample(
            logits, self._slot_index[slot : slot + 1], positions, not request.params.greedy, [slot]
        )
        self._join_batch([slot], [request], first.tokens)
        return list(first.tokens.tolist()), first.logprobs

    def _select_models(self, slots: list[int], requests: list[EngineRequest]) -> None:
        """With several served models: the prefill rows (in this order) run their requests' models."""
        if self._row_models is not None:
            self._row_models.for_prefill(slots, [request.model for request in requests])

    def _take_slots(self, slots: list[int], requests: list[EngineRequest]) -> None:
        """Before a request's first prefill: its slot's blocks and sampling settings."""
        for slot, request in zip(slots, requests, strict=True):
            self.cache.set_blocks(slot, request.blocks)
        self._sampler.set_rows(
            slots,
            [request.params for request in requests],
            [request.seed for request in requests],
            [request.grammar for request in requests],
        )

    def _join_batch(self, slots: list[int], requests: list[EngineRequest], first_tokens: torch.Tensor) -> None:
        sampled = [not request.params.greedy for request in requests]
        self.batch.add(slots, first_tokens, [len(request.prompt_ids) for request in requests], sampled)

    def decode(self) -> StepTokens:
        """One decode step over the batch; returns the new tokens (and log probabilities, for the rows that asked)
        by slot (up to the batch's width)."""
        # A row keeps slot_tokens places (fewer than its positions in a sliding window's ring buffer).
        width, length = self.batch.width, min(self.batch.length, self.cache.plan.slot_tokens)
        decoder = self.decoder
        if self._row_models is not None:
            self._row_models.for_decode()
            if self._row_models.correcting:
                assert self.correcting_decoder is not None  # made with the row models
                decoder = self.correcting_decoder
        logits = decoder.run(width, length)[:width]
        positions = self.batch.positions[:width]
        new = self._sampler.sample(
            logits, self._slot_index[:width], positions, self.batch.any_sampled, list(range(width))
        )
        self.batch.advance(new.tokens, width)
        return list(new.tokens.tolist()), new.logprobs  # the step's one device-to-host copy (with its logprobs)

    def remove(self, slots: list[int]) -> None:
        """The rows of finished requests leave the batch; a paged slot's table points at scratch again."""
        self.batch.remove(slots)
        self._sampler.remove_rows(slots)
        if self._row_models is not None:
            self._row_models.release(slots)
        for slot in slots:
            self.cache.clear_blocks(slot)

    def forward_decode(self, batch: int, length: int) -> torch.Tensor:
        """The model's decode step over slots 0..batch-1 (what CUDA graphs capture): logits [batch, vocab]."""
        mask = self.cache.prepare_decode(self.batch.positions, self.batch.active, batch, length)
        return self._model(
            input_ids=self.batch.tokens[:batch, None],
            position_ids=self.batch.positions[:batch, None],
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1]

    def _prefill_forward(self, slots: list[int], requests: list[EngineRequest]) -> SampledTokens:
        lengths = [len(request.prompt_ids) for request in requests]
        longest = max(lengths)
        input_ids = torch.tensor(
            [request.prompt_ids + [0] * (longest - len(request.prompt_ids)) for request in requests],
            device=self._device,
        )
        slot_index = torch.tensor(slots, device=self._device)
        length_tensor = torch.tensor(lengths, device=self._device)
        mask = self.cache.prepare_prefill(slot_index, length_tensor, longest)
        # Only the logits of each prompt's last token: the distinct last positions, then each row's own.
        last_positions = sorted(set(lengths))
        keep = torch.tensor([length - 1 for length in last_positions], device=self._device)
        self._select_models(slots, requests)
        logits = self._model(
            input_ids=input_ids,
            position_ids=torch.arange(longest, device=self._device).expand(len(requests), longest),
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        column = torch.tensor([last_positions.index(length) for length in lengths], device=self._device)
        row_logits = logits[torch.arange(len(requests), device=self._device), column]
        any_sampled = any(not request.params.greedy for request in requests)
        return self._sampler.sample(row_logits, slot_index, length_tensor - 1, any_sampled, slots)

    def _make_decoder(self, use_graphs: bool, correcting: bool) -> DecodeRunner:
        """The decode step's runner; `correcting`: with the per-row LoRA corrections (captured with them on)."""
        slots, slot_tokens = self.cache.plan.slots, self.cache.plan.slot_tokens
        if self._row_models is not None:
            self._row_models.for_decode()
            self._row_models.correcting = correcting
        # Capture and its check run on a pattern of tokens and positions (free slots, no request's keys are touched),
        # the positions within the shortest attention length the check uses.
        self.batch.tokens.copy_(torch.arange(slots) % int(self._model.config.vocab_size))
        self.batch.positions.copy_(torch.arange(slots) % min(SHORTEST_LENGTH_BUCKET, slot_tokens))
        self.batch.active.fill_(True)  # the pattern rows write their own positions, as requests' rows do
        try:
            with self.cache.spread_for_capture():
                return make_decoder(self.forward_decode, use_graphs, slots, slot_tokens)
        finally:
            self.batch.tokens.zero_()
            self.batch.positions.zero_()
            self.batch.active.fill_(False)


def default_prefill_chunk_tokens(device: torch.device) -> int:
    """Prompt tokens a step prefills while others decode, sized so that a running stream's gap between two tokens
    stays short: on the CPU ~0.2 s of the `small` bench model's prefill; on a GPU with bf16 hardware (A100, H100) a
    chunk that keeps it compute-bound (~20-30 ms for Phi-3-mini); less on older GPUs (a T4 has a tenth of the FLOPs)."""
    if device.type != "cuda":
        return CPU_PREFILL_CHUNK_TOKENS
    major, _minor = torch.cuda.get_device_capability(device)
    return GPU_PREFILL_CHUNK_TOKENS if major >= 8 else OLD_GPU_PREFILL_CHUNK_TOKENS


def cuda_graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _slot(request: EngineRequest) -> int:
    assert request.slot is not None, "the scheduler gives a joining request its slot"
    return request.slot
