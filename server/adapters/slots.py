"""Device-resident LoRA slots and the per-row LoRA op.

Every resident adapter owns one slot of preallocated stacked tensors, per group
(qkv, o, gate_up, down): A[group] [layers, slots, in, max_width] and
B[group] [layers, slots, max_width, out]. An adapter of width w uses the first w columns
of A and rows of B, so mixed ranks share one table without padding work.

The fast op groups a step's tokens into segments of one slot each (the engine orders
tokens by slot), in the spirit of Punica's SGMV:

    for (slot, start, end) in segments:
        out[start:end] += (x[start:end] @ A[slot][:, :w]) @ B[slot][:w]

`lora_reference` computes the same from the per-module PEFT tensors, token by token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.adapters.lora import GROUPS, MODULES, AdapterError, LoraWeights, group_shapes
from server.engine.model import ModelSpec

_MODULES_PER_GROUP = {g: sum(1 for grp, _ in MODULES.values() if grp == g) for g in GROUPS}


class LoraSlotTable:
    def __init__(self, spec: ModelSpec, num_slots: int, max_rank: int, dtype, device) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for group, (in_f, outs) in group_shapes(spec).items():
            w = max_rank * _MODULES_PER_GROUP[group]
            shape_a = (spec.num_layers, num_slots, in_f, w)
            shape_b = (spec.num_layers, num_slots, w, sum(outs))
            self.A[group] = torch.zeros(shape_a, dtype=dtype, device=device)
            self.B[group] = torch.zeros(shape_b, dtype=dtype, device=device)
        # widths[slot][layer][group]: columns used; 0 = the adapter skips that layer/group.
        self.widths: list[list[dict[str, int]]] = [
            [dict.fromkeys(GROUPS, 0) for _ in range(spec.num_layers)] for _ in range(num_slots)
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.A.values(), *self.B.values()])

    def check_fits(self, weights: LoraWeights, adapter_id: str) -> None:
        if weights.rank > self.max_rank:
            raise AdapterError(f"adapter {adapter_id!r} rank {weights.rank} is greater than "
                               f"max rank {self.max_rank} (--max-lora-rank)")

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into a slot (the previous content is overwritten)."""
        widths = self.widths[slot]
        for layer in range(self.spec.num_layers):
            for group in GROUPS:
                pair = weights.pairs.get((layer, group))
                if pair is None:
                    widths[layer][group] = 0
                    continue
                a, b = pair
                w = a.shape[1]
                self.A[group][layer, slot, :, :w].copy_(a)
                self.B[group][layer, slot, :w].copy_(b)
                widths[layer][group] = w

    def clear(self, slot: int) -> None:
        for layer_widths in self.widths[slot]:
            for group in GROUPS:
                layer_widths[group] = 0


class LoraHooks:
    """The model's adapter hook for one step: LoRA deltas over slot segments."""

    def __init__(self, table: LoraSlotTable, segments: Sequence[tuple[int, int, int]]) -> None:
        self.table = table
        self.segments = segments  # (slot, start, end), tokens [start, end) use `slot`

    def linear(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        A, B, widths = self.table.A[group][layer], self.table.B[group][layer], self.table.widths
        for slot, start, end in self.segments:
            w = widths[slot][layer][group]
            if w:
                t = x[start:end] @ A[slot, :, :w]
                out[start:end].addmm_(t, B[slot, :w])


def lora_reference(
    x: torch.Tensor,
    token_adapters: Sequence[LoraWeights | None],
    layer: int,
    group: str,
    spec: ModelSpec,
) -> torch.Tensor:
    """The delta to add to the group's output, token by token, from the PEFT tensors."""
    in_f, outs = group_shapes(spec)[group]
    delta = torch.zeros(x.shape[0], sum(outs), dtype=x.dtype)
    for i, weights in enumerate(token_adapters):
        if weights is None:
            continue
        for module, (grp, idx) in MODULES.items():
            entry = weights.modules.get((layer, module))
            if grp != group or entry is None:
                continue
            a, b, scale = entry
            start = sum(outs[:idx])
            a, b = a.to(x.dtype), b.to(x.dtype)
            delta[i, start : start + outs[idx]] += (x[i] @ a.T) @ b.T * scale
    return delta
