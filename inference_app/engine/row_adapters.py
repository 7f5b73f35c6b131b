"""The base model and several LoRA adapters of it in one batch: each row of a forward pass runs the model it asked for.

The default adapter is merged into the base weights, so a batch of its requests runs exactly as a single merged
model does. Every other served model (the base itself, the other adapters) is those weights plus a low-rank
correction on each row that asks for it, in each layer the adapters touch:

    y = W_merged x + sum over adapters k of c[row, k] * s_k B_k A_k x,   c[row, k] = [row runs k] - [k is merged]

The coefficients c sit in one tensor per KV-cache slot (static shapes: CUDA graphs capture the correction like any
other kernel), and a step whose rows all run the merged model skips the corrections altogether.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

BASE_MODEL = 0  # served model 0 is the base model; served model k + 1 is adapter k


class RowModels:
    """Which served model each row runs: the coefficients every RowLoraLinear reads, and whether any row needs them.

    Served model 0 is the base model, model k + 1 the adapter k; `merged` is the adapter merged into the weights
    (None: none is)."""

    def __init__(self, adapters: int, merged: int | None) -> None:
        self.adapters = adapters
        self.merged = merged
        coefficients = torch.zeros(adapters + 1, adapters)
        for model in range(1, adapters + 1):
            coefficients[model, model - 1] = 1.0
        if merged is not None:
            coefficients[:, merged] -= 1.0
        self._coefficients = coefficients  # [served model, adapter]
        self._slot_models: dict[int, int] = {}
        self.by_slot = torch.zeros(0, adapters)  # allocated for the KV cache's slots by `allocate`
        self.current = self.by_slot  # the rows of the forward pass being run
        self.correcting = False  # whether the forward pass being run computes the corrections

    def allocate(self, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self._coefficients = self._coefficients.to(device=device, dtype=dtype)
        self.by_slot = torch.zeros(slots, self.adapters, device=device, dtype=dtype)
        self.current = self.by_slot

    def needs_correction(self, model: int) -> bool:
        return bool(self._coefficients[model].any())

    def for_prefill(self, slots: list[int], models: list[int]) -> None:
        """The slots join with their models; the next forward pass runs these rows, in this order."""
        index = torch.tensor(models, device=self.by_slot.device)
        self.current = self._coefficients[index]
        self.by_slot[torch.tensor(slots, device=self.by_slot.device)] = self.current
        self._slot_models.update(zip(slots, models, strict=True))
        self.correcting = any(self.needs_correction(model) for model in models)

    def for_decode(self) -> None:
        """The next forward pass runs slots 0..width-1."""
        self.current = self.by_slot
        self.correcting = any(self.needs_correction(model) for model in self._slot_models.values())

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self._slot_models.pop(slot, None)


class RowLoraLinear(nn.Module):
    """A linear layer (the merged weights) plus, per row, the low-rank corrections of the models it does not hold."""

    down: torch.Tensor
    up: torch.Tensor
    owner: torch.Tensor

    def __init__(
        self, base_layer: nn.Module, down: torch.Tensor, up: torch.Tensor, owner: torch.Tensor, rows: RowModels
    ):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("down", down)  # [rank of all adapters here, in]: A of each adapter, stacked
        self.register_buffer("up", up)  # [out, rank of all adapters here]: s * B of each adapter, side by side
        self.register_buffer("owner", owner)  # the adapter each of those ranks belongs to
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.rows.correcting:
            return y
        coefficients = self.rows.current[: x.shape[0]][:, self.owner]  # [rows, ranks]
        low_rank = (x.to(self.down.dtype) @ self.down.T) * coefficients[:, None, :].to(self.down.dtype)
        return y + (low_rank @ self.up.T).to(y.dtype)


def serve_adapters(peft_model: Any, names: list[str], merge_first: bool) -> tuple[Any, RowModels]:
    """The transformers model inside `peft_model` (which holds the adapters `names`, first the default) with each
    LoRA layer replaced by a RowLoraLinear; the first adapter merged into the weights when `merge_first`."""
    rows = RowModels(len(names), 0 if merge_first else None)
    inner = peft_model.base_model.model
    for module_name, module in list(inner.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        if any(module.lora_variant.values()) or any(module.lora_bias.values()):
            raise ValueError(f"{module_name}: DoRA and LoRA biases are not supported with several adapters")
        if merge_first and names[0] in module.lora_A:
            module.merge(adapter_names=[names[0]])  # peft's own merge: the same weights as merge_and_unload
        # peft's ModuleDicts of each adapter's A and B (typed Any: nn.Module's attributes are Tensor | Module).
        lora_a: Any = module.lora_A
        lora_b: Any = module.lora_B
        held = [index for index, name in enumerate(names) if name in lora_a]
        down = torch.cat([lora_a[names[index]].weight for index in held])
        up = torch.cat([lora_b[names[index]].weight * module.scaling[names[index]] for index in held], dim=1)
        owner = torch.cat(
            [torch.full((lora_a[names[index]].weight.shape[0],), index, dtype=torch.long) for index in held]
        )
        replacement = RowLoraLinear(module.get_base_layer(), down.detach(), up.detach(), owner.to(down.device), rows)
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(inner.get_submodule(parent_name), child_name, replacement)
    return inner, rows
