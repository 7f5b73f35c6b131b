"""Running the decode step: eager, or as CUDA graphs captured at start for a few batch and length buckets.

A decode step over `batch` rows attending to `length` positions launches ~1000 small kernels; on a GPU the CPU
time to launch them is longer than the GPU time to run them. A CUDA graph replays the whole step with one launch.
Graphs have fixed shapes, so the step runs for a bucket: the batch is padded up to the next batch bucket (rows
beyond the requests are free slots that compute and write harmlessly at position 0) and attention reads up to the
next length bucket.

If capturing fails (or a replay disagrees with the eager step), the engine logs one line and runs eager: a faster
step is never a reason for the service not to start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SHORTEST_LENGTH_BUCKET = 256

# step(batch, length) -> logits [batch, vocab]: the model's forward pass over the first `batch` slots.
DecodeStep = Callable[[int, int], torch.Tensor]


def bucket_for(needed: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `needed`; None when none does."""
    return next((bucket for bucket in buckets if bucket >= needed), None)


def length_buckets(slot_tokens: int) -> tuple[int, ...]:
    """Powers of two from SHORTEST_LENGTH_BUCKET, and the slot length itself as the last."""
    buckets = []
    length = SHORTEST_LENGTH_BUCKET
    while length < slot_tokens:
        buckets.append(length)
        length *= 2
    return (*buckets, slot_tokens)


class DecodeRunner(Protocol):
    description: str

    def run(self, batch: int, length: int) -> torch.Tensor:
        """Logits [at least `batch` rows, vocab] of a decode step over slots 0..batch-1 attending to `length`."""
        ...


class EagerDecoder:
    """Runs the step as it is, at the exact batch and length (no padding needed)."""

    description = "eager"

    def __init__(self, step: DecodeStep) -> None:
        self._step = step

    def run(self, batch: int, length: int) -> torch.Tensor:
        return self._step(batch, length)


class GraphDecoder:
    """Replays the step's CUDA graph for the buckets that hold the batch; eager beyond the largest bucket."""

    def __init__(
        self,
        step: DecodeStep,
        graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]],
        batches: tuple[int, ...],
        lengths: tuple[int, ...],
        seconds: float,
    ) -> None:
        self._step = step
        self._graphs = graphs
        self._batch_buckets = batches
        self._length_buckets = lengths
        self.description = f"CUDA graphs ({len(graphs)} captured in {seconds:.1f} s)"

    @classmethod
    def capture(cls, step: DecodeStep, max_batch: int, slot_tokens: int) -> GraphDecoder:
        started = time.perf_counter()
        batches = batch_buckets(max_batch)
        lengths = length_buckets(slot_tokens)
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # One side stream for every warm-up: the allocator reuses freed memory only on the stream that freed it.
        side_stream = torch.cuda.Stream()
        # Largest first: the smaller graphs then reuse the memory pool the largest one sized.
        for batch in reversed(batches):
            for length in reversed(lengths):
                side_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side_stream):  # warm-up outside the graph, as capture requires
                    step(batch, length)
                torch.cuda.current_stream().wait_stream(side_stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = step(batch, length)
                graphs[batch, length] = (graph, logits)
        torch.cuda.synchronize()
        return cls(step, graphs, batches, lengths, time.perf_counter() - started)

    def run(self, batch: int, length: int) -> torch.Tensor:
        batch_bucket = bucket_for(batch, self._batch_buckets)
        length_bucket = bucket_for(length, self._length_buckets)
        if batch_bucket is None or length_bucket is None:
            return self._step(batch, length)
        graph, logits = self._graphs[batch_bucket, length_bucket]
        graph.replay()
        return logits

    def agrees_with_eager(self, batch: int, length: int) -> bool:
        """Whether a replay gives the eager step's greedy tokens (a check that capture recorded the right work)."""
        eager = self._step(batch, length).argmax(dim=-1)
        replayed = self.run(batch, length)[:batch].argmax(dim=-1)
        return bool(torch.equal(eager, replayed))


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """BATCH_BUCKETS up to the slot count, and the slot count itself (when it is at most the largest bucket)."""
    if max_batch > BATCH_BUCKETS[-1]:
        return BATCH_BUCKETS
    return (*(bucket for bucket in BATCH_BUCKETS if bucket < max_batch), max_batch)


def make_decoder(step: DecodeStep, use_graphs: bool, max_batch: int, slot_tokens: int) -> DecodeRunner:
    """CUDA graphs when asked for and they capture and agree with the eager step; else the eager step, with one
    log line saying why."""
    if not use_graphs:
        return EagerDecoder(step)
    try:
        decoder = GraphDecoder.capture(step, max_batch, slot_tokens)
        agrees = decoder.agrees_with_eager(min(max_batch, BATCH_BUCKETS[-1]), min(slot_tokens, SHORTEST_LENGTH_BUCKET))
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else ""
        logger.warning("CUDA graph capture failed, decoding runs eager (slower): %s: %s", type(error).__name__, message)
        return EagerDecoder(step)
    if not agrees:
        logger.warning("CUDA graph replay disagreed with the eager decode step, decoding runs eager (slower)")
        return EagerDecoder(step)
    return decoder
