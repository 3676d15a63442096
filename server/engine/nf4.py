"""bitsandbytes' nf4 projections of the base model (`--quantize nf4`): what QLoRA trains
against, and fast on CUDA. Model surgery like server.engine.quant: `quantize_nf4` swaps
each layer's Projection for a QuantProjection; the forward paths call `.forward(x)` on
whatever they hold. (`--quantize int8|int4|bf16` are server.engine.quant's, several times
faster on a CPU.)
"""

from __future__ import annotations

import torch
from torch import nn

_PROJECTIONS = ("qkv", "o", "gate_up", "down")


class Nf4Error(Exception):
    """bitsandbytes is missing or the mode is not one of its; the message is one line
    (server.engine.loading raises it as a ModelLoadError with the same message)."""


class QuantProjection(nn.Module):
    """A Projection whose weight lives in bitsandbytes' nf4 format (`--quantize nf4`: what
    QLoRA trains against, and fast on CUDA); the compute (and any adapter on top) stays
    in the model's dtype. Its int8 mode is kept for callers that ask for bitsandbytes'
    int8; `--quantize int8|int4` use server.engine.quant, several times faster on a CPU."""

    def __init__(self, proj: nn.Module, mode: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise Nf4Error("--quantize needs the bitsandbytes package") from e
        weight = proj.weight.detach().float()  # [out, in]
        out_f, in_f = weight.shape
        has_bias = proj.bias is not None
        if mode == "nf4":
            inner = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=dtype,
                                      quant_type="nf4")
            inner.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        elif mode == "int8":
            inner = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False,
                                        threshold=0.0)
            inner.weight = bnb.nn.Int8Params(weight, requires_grad=False,
                                             has_fp16_weights=False)
        else:
            raise Nf4Error(f"quantize {mode!r} is not one of nf4, int8 (bitsandbytes)")
        if has_bias:
            inner.bias = nn.Parameter(proj.bias.detach().clone(), requires_grad=False)
        self.inner = inner.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(x.dtype)


def quantize_nf4(model: nn.Module, dtype: torch.dtype, device) -> None:
    """Swap every layer's projections for nf4 QuantProjections (in place)."""
    for layer in model.layers:
        for name in _PROJECTIONS:
            setattr(layer, name, QuantProjection(getattr(layer, name), "nf4", dtype, device))
