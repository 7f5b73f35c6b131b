"""The model runner: the decode batch covers rows up to the highest slot in use; the decode step holds nothing a CUDA
graph cannot."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from inference_app.engine.engine_loop import BatchingEngine
from inference_app.engine.model_runner import DecodeBatch
from tests.app.engine.engine_harness import CAPTURE_BREAKERS, LAYOUTS, OpRecorder


def test_decode_batch_covers_rows_up_to_the_highest_slot_in_use() -> None:
    batch = DecodeBatch(slots=4, device=torch.device("cpu"))
    batch.add([0, 1, 2], torch.tensor([7, 8, 9]), [5, 30, 12], sampled=[False, True, False])
    assert batch.any_sampled
    assert (batch.width, batch.length) == (3, 31)
    batch.remove([2])  # the top row leaves: the batch narrows
    assert (batch.width, batch.length, len(batch)) == (2, 31, 2)
    batch.remove([1])  # the only sampled row leaves: the step may skip the sampling kernels
    assert not batch.any_sampled
    batch.add([1], torch.tensor([8]), [30], sampled=[False])
    batch.remove([0])  # a hole below: the row still computes, harmlessly, at position 0 of a free slot
    assert (batch.width, len(batch)) == (2, 1)
    assert batch.tokens.tolist() == [0, 8, 0, 0] and batch.positions.tolist() == [0, 30, 0, 0]
    batch.advance(torch.tensor([4, 6]), width=2)
    assert batch.tokens.tolist() == [0, 6, 0, 0] and batch.positions.tolist() == [0, 31, 0, 0]
    assert batch.length == 32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_decode_step_has_nothing_a_cuda_graph_cannot_hold(
    start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    engine = start_engine(max_batch_size=4, **LAYOUTS[layout])
    with torch.inference_mode(), OpRecorder() as recorder:
        engine._runner.forward_decode(4, 256)  # what GraphDecoder.capture records
    assert "aten.scaled_dot_product_attention.default" in recorder.ops  # the recorder saw the model run
    assert recorder.ops & CAPTURE_BREAKERS == set()
