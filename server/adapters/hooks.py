"""The model's adapter hooks for one step: every adapter type in one batch.

Tokens of a step are ordered by adapter slot, so the rows of one adapter are one
contiguous token range. LoRA goes through one `LoraHooks` per rank bucket in use
(segments and/or batched over that bucket's slot table; the buckets' rows are disjoint);
the kinds with `range_ops` (IA3, bottleneck: kinds.py says what each does) are applied
per token range, through their kind's `input_scale` and `linear`. The ranges are
disjoint, so each row gets its own adapter's ops whatever the order of the ranges.
Soft prompts and prefixes need no per-layer work: the engine places them in the row's
input embeddings and KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.adapters.formats import AdapterWeights
from server.adapters.kinds import AdapterKind
from server.adapters.slots import LoraHooks


class AdapterHooks:
    def __init__(self, lora: Sequence[LoraHooks],
                 ranges: Sequence[tuple[int, int, type[AdapterKind], AdapterWeights]],
                 group_modules: dict[str, list[tuple[str, int, int, int]]]) -> None:
        """ranges: (start, end, kind, device weights) of the token ranges of adapters
        whose kind has range_ops."""
        self.lora = lora
        self.ranges = ranges
        self.group_modules = group_modules

    def pre(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """Input of o_proj / down_proj, scaled for IA3 rows (a new tensor if changed)."""
        scaled = None
        for start, end, kind, w in self.ranges:
            vec = kind.input_scale(w, layer, group)
            if vec is not None:
                if scaled is None:
                    scaled = x.clone()
                scaled[start:end] *= vec
        return x if scaled is None else scaled

    def linear(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        for lora in self.lora:
            lora.linear(layer, group, x, out)
        modules = self.group_modules[group]
        for start, end, kind, w in self.ranges:
            kind.linear(w, layer, group, out, start, end, modules)
