"""The model's adapter hooks for one step: every adapter type in one batch.

Tokens of a step are ordered by adapter slot, so the rows of one adapter are one
contiguous token range. LoRA goes through one `LoraHooks` per rank bucket in use
(segments and/or batched over that bucket's slot table; the buckets' rows are disjoint);
IA3 and bottleneck adapters are applied per token range:

    IA3:        y[rows, cols(m)] *= l_m          (output scaling, e.g. k_proj, v_proj)
                x[rows] *= l_m  before m          (input scaling: o_proj, down_proj)
    bottleneck: y[rows] += up(act(down(rmsnorm(y[rows]))))  after o_proj and down_proj
Soft prompts and prefixes need no per-layer work: the engine places them in the row's
input embeddings and KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapter_format.bottleneck import bottleneck_delta
from server.adapters.formats import BottleneckWeights, IA3Weights
from server.adapters.slots import LoraHooks

_POSITION = {"o": "attn", "down": "mlp"}
_INPUT_MODULE = {"o": "o_proj", "down": "down_proj"}


class AdapterHooks:
    def __init__(self, lora: Sequence[LoraHooks],
                 ranges: Sequence[tuple[int, int, IA3Weights | BottleneckWeights]],
                 group_modules: dict[str, list[tuple[str, int, int, int]]]) -> None:
        self.lora = lora
        self.ia3 = [(s, e, w) for s, e, w in ranges if isinstance(w, IA3Weights)]
        self.bottleneck = [(s, e, w) for s, e, w in ranges if isinstance(w, BottleneckWeights)]
        self.group_modules = group_modules

    def pre(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """Input of o_proj / down_proj, scaled for IA3 rows (a new tensor if changed)."""
        module = _INPUT_MODULE.get(group)
        scaled = None
        for start, end, w in self.ia3:
            vec = w.in_scale.get((layer, module))
            if vec is not None:
                if scaled is None:
                    scaled = x.clone()
                scaled[start:end] *= vec
        return x if scaled is None else scaled

    def linear(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        for lora in self.lora:
            lora.linear(layer, group, x, out)
        for start, end, w in self.ia3:
            for name, _, off, size in self.group_modules[group]:
                vec = w.out_scale.get((layer, name))
                if vec is not None:
                    out[start:end, off : off + size] *= vec
        position = _POSITION.get(group)
        if position is None:
            return
        for start, end, w in self.bottleneck:
            weights = w.layers.get((layer, position))
            if weights is not None:
                out[start:end] += bottleneck_delta(out[start:end], weights, w.activation, w.eps)
