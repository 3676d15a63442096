"""How the decoder's matmuls and decode steps run: PyTorch's ops or the C kernels of
server.native, chosen once per engine (`ModelOps.pick`) and handed to the model
(`DecoderModel.use_ops`), so that server.engine.model holds the math only.

  * `ModelOps.linear(proj, x)`: a plain `Projection` of fewer than FEW_ROWS rows through
    the few-row C kernel (`native_linear`: f32_matmul for fp32 weights, bf16_matmul for
    bf16 ones) when the ops have the kernels, anything else (more rows, the quantized
    projections of server.engine.quant and server.engine.nf4) through its own forward;
    `ModelOps.logits(w, x)` the same for the output head.
  * `ModelOps.fused_decode`: steps of decode tokens only run the work between the matmuls
    in decode.c (`ModelOps.decode_ops`, server.native.DecodeOps: fp32 on the CPU).

Which ops, by (--cpu-kernels, device, dtype):
  * CPU, float32, auto or native, the kernels built: fused decode and the f32 few-row
    kernel (server.native.pick; native: a build failure is an error);
  * CPU, bfloat16, auto, the kernels built: the bf16 few-row kernel on the projections
    and the head, the rest of the step PyTorch's (server.native.pick_bf16);
  * anything else (torch, CUDA, float16, no compiler): PyTorch's ops only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server import native
from server.engine.quant import SMALL_MATMUL, linear_packed, pack_weight

# steps of fewer rows than this take plain projections and the output head through the C
# kernel (ModelOps.linear, .logits): in fp32 1.2-1.7x BLAS's speed at 1 row, 2.5-3x at
# 4-8, 1.5x at 16, about even at 32 and slower from 64 (default model's shapes, 2
# threads); in bf16 PyTorch's matmul of one row is ~60x slower
FEW_ROWS = 32
# with --prepack-weights, from this many rows on a plain projection runs on its oneDNN copy:
# the default model's 120 projections, weights cold, 2 threads, Zen 5 (C kernel / packed):
# 1 row 16.7 / 26.3 ms, 2 rows 18.0 / 28.6, 4 rows 26.2 / 24.6, 16 rows 63.8 / 32.9, 32
# rows BLAS 112.9 / 60.5 (docs/performance.md)
PACKED_ROWS = 4


def native_linear(kernels, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """x [R, in] @ w[out, in]^T (+ bias) with server/csrc/quant.c's few-row kernel:
    f32_matmul for fp32 weights, bf16_matmul for bf16 ones (x, the bias and the result in
    the weight's dtype; a bf16 product is summed in fp32 and rounded once). The operands
    are checked first, the kernel taking raw pointers."""
    n_out, k_in = w.shape
    dtype = w.dtype
    if dtype not in (torch.float32, torch.bfloat16) or x.dtype != dtype or x.dim() != 2 \
            or x.shape[1] != k_in or not w.is_contiguous() or x.device.type != "cpu" \
            or w.device.type != "cpu" or (bias is not None and (
                bias.shape != (n_out,) or bias.dtype != dtype or not bias.is_contiguous())):
        raise ValueError(f"native_linear: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} "
                         f"{w.dtype}: needs CPU tensors of one dtype (float32 or bfloat16), "
                         f"x [R, {k_in}], w and the bias ({n_out},) contiguous")
    if dtype == torch.bfloat16:
        fn, x = kernels.bf16_matmul, x.float()
        bias = None if bias is None else bias.float()
    else:
        fn = kernels.f32_matmul
        if x.stride(1) != 1:
            x = x.contiguous()
    rows = x.shape[0]
    y = x.new_empty(rows, n_out)
    threads = 1 if rows * n_out * k_in < SMALL_MATMUL else torch.get_num_threads()
    fn(x.data_ptr(), x.stride(0), rows, w.data_ptr(),
       None if bias is None else bias.data_ptr(), n_out, k_in, y.data_ptr(), n_out, threads)
    return y if dtype == torch.float32 else y.to(dtype)


class Projection(nn.Module):
    """y = x @ W^T + b, W [out, in] (nn.Linear's layout). The model calls it through
    `ModelOps.linear`: fewer than FEW_ROWS rows on the CPU go through the C kernel when
    the ops have it, the rest through BLAS (`forward`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # oneDNN's copy of the weight (`prepack`, --prepack-weights), or None
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Keep oneDNN's blocked copy of the weight beside it (the CPU only): ModelOps.linear
        takes steps of PACKED_ROWS rows or more through it."""
        self.packed = pack_weight(self.weight.detach())

    @property
    def packed_nbytes(self) -> int:
        p = self.packed
        return 0 if p is None else p.numel() * p.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """weight in nn.Linear's [out, in] layout (a packed copy follows it)."""
        self.weight.copy_(weight)
        if self.bias is not None:
            self.bias.copy_(bias)
        if self.packed is not None:
            self.prepack()


class ModelOps:
    """The ops a DecoderModel calls, chosen once (`pick`; the module docstring says which
    in which case). kernels: server.native.Kernels for the few-row matmuls (and the LoRA
    slot tables: SlotBuckets), or None for PyTorch's ops; fused_decode: steps of decode
    tokens only run in decode.c between the matmuls (fp32 on the CPU, needs kernels)."""

    def __init__(self, kernels: native.Kernels | None = None, fused_decode: bool = False
                 ) -> None:
        if fused_decode and kernels is None:
            raise ValueError("fused decode needs the native kernels")
        self.kernels = kernels
        self.fused_decode = fused_decode

    @classmethod
    def pick(cls, mode: str, device: torch.device, dtype: torch.dtype) -> ModelOps:
        """The ops for `--cpu-kernels` mode (auto, native, torch) on `device` in `dtype`;
        raises server.native.NativeError where native was asked and cannot be had."""
        kernels = native.pick(mode, device, dtype)  # fp32 on the CPU
        if kernels is not None:
            return cls(kernels, fused_decode=True)
        return cls(native.pick_bf16(mode, device, dtype))  # bf16 on the CPU, auto

    def __repr__(self) -> str:
        return (f"ModelOps(kernels={self.kernels is not None}, "
                f"fused_decode={self.fused_decode})")

    def linear(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """proj(x), x [R, in]: a plain Projection through its pre-packed copy from
        PACKED_ROWS rows when it has one (--prepack-weights), else of fewer than FEW_ROWS
        rows through the C kernel when the ops have it; anything else (quantized
        projections keep their own kernels) through its own forward."""
        if type(proj) is Projection:
            rows = x.shape[0]
            if proj.packed is not None and rows >= PACKED_ROWS:
                return linear_packed(x, proj.weight, proj.packed, proj.bias)
            if self.kernels is not None and rows < FEW_ROWS:
                return native_linear(self.kernels, x, proj.weight, proj.bias)
        return proj.forward(x)

    def logits(self, w: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | None = None
               ) -> torch.Tensor:
        """x [R, hidden] @ w [vocab, hidden]^T (the output head), as `linear` chooses
        (packed: the head's pre-packed copy, --prepack-weights)."""
        if packed is not None and x.shape[0] >= PACKED_ROWS:
            return linear_packed(x, w, packed)
        if self.kernels is not None and x.shape[0] < FEW_ROWS:
            return native_linear(self.kernels, x, w, None)
        return torch.mm(w, x.T).T

    def decode_ops(self, hidden: int, intermediate: int, heads: int, kv_heads: int,
                   head_dim: int, eps: float, scale: float) -> native.DecodeOps:
        """decode.c's kernels for one model's shapes (checked: server.native.DecodeOps)."""
        if not self.fused_decode:
            raise ValueError(f"{self!r} has no fused decode")
        return native.DecodeOps(self.kernels, hidden, intermediate, heads, kv_heads,
                                head_dim, eps, scale)


TORCH_OPS = ModelOps()  # PyTorch's ops only: a model's until the engine hands it others
