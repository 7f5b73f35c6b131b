"""The model runner: the decode batch covers rows up to the highest slot in use; the decode step holds nothing a CUDA
graph cannot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference_app.engine.engine_loop import BatchingEngine
from inference_app.engine.model_runner import DecodeBatch
from tests.app.engine.engine_harness import LAYOUTS


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


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(func))
        indices = args[1] if str(func).startswith(("aten.index.", "aten.index_put")) else ()
        if any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices):
            self.ops.add("indexing with a boolean mask")  # its size depends on the mask's values: a sync
        return func(*args, **(kwargs or {}))


# Operations a CUDA graph cannot hold: they wait for the device (a value read back on the host) or copy host data in.
_CAPTURE_BREAKERS = {
    "aten.item.default",
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.lift_fresh.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.masked_select.default",
    "indexing with a boolean mask",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_decode_step_has_nothing_a_cuda_graph_cannot_hold(
    start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    engine = start_engine(max_batch_size=4, **LAYOUTS[layout])
    with torch.inference_mode(), _OpRecorder() as recorder:
        engine._runner.forward_decode(4, 256)  # what GraphDecoder.capture records
    assert "aten.scaled_dot_product_attention.default" in recorder.ops  # the recorder saw the model run
    assert recorder.ops & _CAPTURE_BREAKERS == set()
