"""Weight-only int8, int4 and bf16 projections of the base model (`--quantize
int8|int4|bf16`).

Model surgery, not model code: `quantize_model` walks a loaded DecoderModel and swaps each
layer's Projection (qkv, o, gate_up, down) for a QuantizedProjection; the forward paths
call `.forward(x)` on whatever they hold. Activations and adapters stay in the model's
dtype; only the stored weights shrink:

  int8: per output channel, symmetric:   w[n, k] = scale[n] * q[n, k],  q in -127..127
  int4: per output channel and group of GROUP inputs, asymmetric:
        w[n, k] = lo[n, g] + scale[n, g] * u[n, k],  u in 0..15,  g = k // GROUP
  bf16: w rounded to bf16 (half fp32's bytes; what `--dtype auto` picks on a CPU with
        avx512_bf16 or AMX: the rest of the model stays fp32, in the C decode kernels)
  w8a8, w4a8: int8 or int4 weights as above, and the activations rounded to int8 in
        blocks of ACT_BLOCK inputs, each with its own scale (max |x| / 127 over the block)
        before the base matmul, which then runs in integer arithmetic (server/csrc/qa8.c:
        AVX-512 VNNI or AVX2 integer dot products), as llama.cpp's Q8_0 and Q4_0 do: no
        longer the fp32 matmul with the dequantized weights, but that of the rounded
        activations (`round_activations`); adapters still see the unrounded ones

On the CPU in fp32 the matmul is server/csrc/quant.c (the weights dequantized in
registers: decode reads 1, about 0.6 or 2 bytes a weight instead of 4; w8a8 and w4a8:
qa8.c for every row count, its integer GEMM faster than BLAS's fp32 one even at 512 rows),
and from GEMM_ROWS rows on (prefill) the reference below, whose BLAS GEMM is faster there
(bf16 weights: from BF16_GEMM_ROWS rows on, and wherever the kernels are missing,
PyTorch's bf16 GEMM);
anywhere else (bf16 activations, CUDA, no C compiler, `--cpu-kernels torch`) the reference
below: the weight dequantized to x's dtype, then a matmul. `dequantized()` gives the fp32
weight the model computes with, which the tests load into transformers as the oracle.
(bitsandbytes' nf4 is server.engine.nf4's, for QLoRA-trained adapters and CUDA.)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "bf16", "w8a8", "w4a8")
# the modes that round the activations to int8, and the weights' format of each
ACT8_MODES = {"w8a8": "int8", "w4a8": "int4"}
# their activations' block: inputs that share one scale (llama.cpp's Q8_0 has 32; one scale
# a row of 576 cost w8a8 2.3% perplexity on the default model, blocks of 32 0.3%:
# benchmarks/quality.py); also int4's GROUP, which w4a8's kernel assumes
ACT_BLOCK = 32
GROUP = 32  # int4 inputs per scale; measured in benchmarks/quant_kernels.py
_PROJECTIONS = ("qkv", "o", "gate_up", "down")
# matmuls of fewer multiply-adds than this run on one thread (a tiny model's); the default
# model's one-row projections (0.3-1.8 M) use every --threads thread: one stream 1.4x
# (int8) and 1.5x (int4) faster than on one thread (docs/performance.md). On a machine
# whose cores other processes keep busy an OpenMP team's join can stall; --threads 1 there.
SMALL_MATMUL = 1 << 16
# from this many rows on (prefill chunks) the weight is dequantized to fp32 for the call and
# multiplied by BLAS: its GEMM beats the kernels' 8-row tiles there (0.5-0.8x the kernels'
# time at 256-512 rows, 0.8-1.0x at 128, 1.1-2x slower at 32-64; default model's shapes,
# int8 and int4, this 2-core AVX2 EPYC: docs/performance.md)
GEMM_ROWS = 128
# bf16 weights: from this many rows on (a batch of decode rows, prefill) the matmul is
# PyTorch's bf16 GEMM on the activations rounded to bf16 (as `--dtype bfloat16` computes),
# summed in fp32 inside it; below, the kernel on the fp32 activations, which reads the
# weights once per 8 rows and falls behind the GEMM from about 32 rows (measured in
# benchmarks/profile_decode.py --rows 32 on a Zen 5 with avx512_bf16).
BF16_GEMM_ROWS = 32


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of an fp32 or bf16 weight [out, in] on the CPU, for
    `linear_packed`; None where oneDNN is missing. PyTorch's bf16 GEMM on the plain weight
    reorders it into this layout at every call: with the copy made once, the default
    model's 120 projections of a 32-row step took 31-35 ms instead of 42-49 (Zen 5 with
    avx512_bf16, weights cold; the result bit-identical), for a second copy of the weights
    in memory. fp32 (`--prepack-weights`): 60.5 ms against BLAS's 112.9 (the result
    within fp32 rounding of it)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    except (RuntimeError, AttributeError) as e:  # an old or reduced build
        log.warning("weights are not pre-packed for oneDNN: %s", e)
        return None


def linear_packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, in] @ weight^T (+ bias), x in the weight's dtype: through the pre-packed copy
    when there is one (bf16: the same result as F.linear on the plain weight, bit for
    bit), else F.linear."""
    if packed is None:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class QuantizeError(ValueError):
    """A weight that this format cannot hold; the message names the shape and the limit."""


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(w: torch.Tensor, group: int = GROUP
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], scale [N, K/group], lo [N, K/group]); K and
    group multiples of 32. In each 32-input block, byte i holds input i (low nibble) and
    input 16 + i (high nibble)."""
    n_out, k_in = w.shape
    if group % 32 or k_in % group:
        raise QuantizeError(f"int4 needs in_features ({k_in}) to be a multiple of the group "
                            f"size {group} (itself a multiple of 32)")
    wg = w.float().view(n_out, k_in // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    u = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    u = u.view(n_out, k_in // 32, 2, 16)
    packed = u[:, :, 0] | (u[:, :, 1] << 4)
    return packed.reshape(n_out, k_in // 2).contiguous(), scale.contiguous(), lo.contiguous()


def interleave_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8's q [N, K] -> (the layout of qa8.c's q8a8_matmul: for each block of 16
    output channels, K / 4 runs of 64 bytes, byte 4 * lane + b of run j holding
    q[lane, 4 j + b], N padded to 16 and K to ACT_BLOCK with zeros; 128 times the sum of
    each block of ACT_BLOCK inputs, [blocks, K / ACT_BLOCK, 16] int32)."""
    n_out, k_in = q.shape
    blocks, k_pad = -(-n_out // 16), -(-k_in // ACT_BLOCK) * ACT_BLOCK
    padded = q.new_zeros(blocks * 16, k_pad)
    padded[:n_out, :k_in] = q
    wsum = padded.view(blocks, 16, k_pad // ACT_BLOCK, ACT_BLOCK).sum(3, dtype=torch.int32)
    return (padded.view(blocks, 16, k_pad // 4, 4).transpose(1, 2).contiguous(),
            (wsum * 128).transpose(1, 2).contiguous())


def deinterleave_int8(q: torch.Tensor, n_out: int, k_in: int) -> torch.Tensor:
    """interleave_int8's inverse: q [N, K]."""
    blocks, quads = q.shape[:2]
    return q.transpose(1, 2).reshape(blocks * 16, quads * 4)[:n_out, :k_in]


def interleave_int4(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4's weight (groups of 32) -> the layout of qa8.c's q4a8_matmul: for each
    block of 16 output channels (the last padded with zeros) and group g, 4 pairs of 64
    bytes, byte 4 * lane + b of pair p holding u[lane, 32 g + 8 p + b] (low nibble) and
    u[lane, 32 g + 8 p + 4 + b] (high); scale and lo as [blocks, groups, 16]. As many
    bytes as before (and padding)."""
    n_out, ng = scale.shape
    blocks = -(-n_out // 16)
    u = _unpack_int4(packed)
    u = torch.cat([u, u.new_zeros(blocks * 16 - n_out, u.shape[1])])
    u = u.view(blocks, 16, ng, 4, 2, 4)  # block, lane, group, pair, half, b
    q = (u[:, :, :, :, 0] | (u[:, :, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)

    def per_block(t):
        t = torch.cat([t, t.new_zeros(blocks * 16 - n_out, ng)])
        return t.view(blocks, 16, ng).transpose(1, 2).contiguous()

    return q.contiguous(), per_block(scale), per_block(lo)


def deinterleave_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, n_out: int
                      ) -> torch.Tensor:
    """The fp32 weight [n_out, K] of interleave_int4's layout."""
    blocks, ng = scale.shape[:2]
    u = torch.stack([q & 15, q >> 4], dim=4)  # block, group, pair, lane, half, b
    u = u.permute(0, 3, 1, 2, 4, 5).reshape(blocks * 16, ng, 32).float()
    s = scale.transpose(1, 2).reshape(blocks * 16, ng, 1)
    low = lo.transpose(1, 2).reshape(blocks * 16, ng, 1)
    return (low + s * u).reshape(blocks * 16, ng * 32)[:n_out]


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq [..., K / ACT_BLOCK, ACT_BLOCK]: integers in -127..127 as x's
    float dtype, scale [..., K / ACT_BLOCK, 1]): each block of ACT_BLOCK inputs (the last
    padded with zeros) rounded to int8 with its own scale max|x| / 127, half to even (what
    qa8.c does)."""
    k_in = x.shape[-1]
    pad = -k_in % ACT_BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], -1, ACT_BLOCK)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # (tensor / tensor: `127.0 / amax` would multiply by amax's reciprocal, not what C does)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv).clamp(-127, 127), amax / 127.0


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x with each block of ACT_BLOCK inputs rounded to int8 (quantize_blocks), in x's
    dtype: the input w8a8 and w4a8 multiply the weights with."""
    xq, xs = quantize_blocks(x.float())
    return (xq * xs).flatten(-2)[..., :x.shape[-1]].to(x.dtype)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """quantize_int4's bytes [N, K/2] -> u [N, K] (uint8, 0..15)."""
    n_out, half = packed.shape
    blocks = packed.view(n_out, half // 16, 1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).view(n_out, 2 * half)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor
                    ) -> torch.Tensor:
    n_out, half = packed.shape
    u = _unpack_int4(packed).view(n_out, scale.shape[1], -1).float()
    return (lo[..., None] + scale[..., None] * u).view(n_out, 2 * half)


class QuantizedProjection(nn.Module):
    """y = x @ W^T + b with W in int8 or int4 (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str,
                 kernels=None) -> None:
        """weight [out, in] (nn.Linear's layout); kernels: server.native.Kernels or None."""
        super().__init__()
        if mode not in MODES:
            raise QuantizeError(f"quantize {mode!r} is not one of {', '.join(MODES)}")
        # mode: the weights' format; act8: the activations rounded to int8 (w8a8, w4a8)
        self.act8 = mode in ACT8_MODES
        self.mode = mode = ACT8_MODES.get(mode, mode)
        self.out_features, self.in_features = weight.shape
        if mode == "bf16":
            q, scale = weight.detach().to(torch.bfloat16).contiguous(), None
            self.register_buffer("lo", None)
        elif mode == "int8":
            q, scale = quantize_int8(weight)
            if self.act8:  # qa8.c's layout, and its sums of each block of weights
                q, wsum128 = interleave_int8(q)
                self.register_buffer("wsum128", wsum128)
            self.register_buffer("lo", None)
        else:
            q, scale, lo = quantize_int4(weight)
            if self.act8:  # qa8.c's layout
                q, scale, lo = interleave_int4(q, scale, lo)
            self.register_buffer("lo", lo)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.kernels = kernels
        self._prepacked = False  # `prepack` asked for (kept across .to(): `_bind`)
        self._bind()

    def prepack(self) -> None:
        """bf16 weights (--prepack-weights, on by default for them): keep oneDNN's copy of
        the weight for the GEMM path (pack_weight); other modes have no such path."""
        if self.mode == "bf16":
            self._prepacked = True
            self._packed = pack_weight(self.q)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the weight's pre-packed copy (pack_weight), 0 without one."""
        p = self._packed
        return 0 if p is None else p.numel() * p.element_size()

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [out, in] this projection computes with."""
        if self.mode == "bf16":
            return self.q.float()
        if self.mode == "int8" and self.act8:
            return dequantize_int8(deinterleave_int8(self.q, self.out_features,
                                                     self.in_features), self.scale)
        if self.mode == "int8":
            return dequantize_int8(self.q, self.scale)
        if self.act8:
            return deinterleave_int4(self.q, self.scale, self.lo, self.out_features)
        return dequantize_int4(self.q, self.scale, self.lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bf16" and x.dtype == torch.float32 and x.dim() == 2 and (
                self._call is None or x.shape[0] >= BF16_GEMM_ROWS):
            y = linear_packed(x.to(torch.bfloat16), self.q, self._packed).float()
            return y if self.bias is None else y + self.bias
        if self._call is not None and x.dtype == torch.float32 and x.dim() == 2 \
                and not x.is_cuda and (self.act8 or x.shape[0] < GEMM_ROWS):
            return self._native(x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain implementation: dequantize, then one matmul in x's dtype (w8a8 and
        w4a8: of x rounded to int8 in blocks, `round_activations`)."""
        if self.act8:
            x = round_activations(x)
        y = x @ self.dequantized().to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):  # .to() and friends move the buffers: re-bind
        out = super()._apply(fn, recurse)
        self._bind()
        return out

    def _bind(self) -> None:
        """The kernel and its weight arguments, looked up once (a decode step makes over a
        hundred of these calls: Module attribute lookups and ctypes conversions were most
        of a small projection's time)."""
        self._call, self._weight_args = None, ()
        nk, q = self.kernels, self.q
        # bf16 on the CPU after `prepack`: oneDNN's copy of the weight for the GEMM path
        self._packed = pack_weight(q) if self._prepacked else None
        if nk is None or q.device.type != "cpu" or (
                self.bias is not None and self.bias.dtype != torch.float32):
            return
        bias = self.bias.data_ptr() if self.bias is not None else None
        if self.mode == "bf16":
            self._call = nk.bf16_matmul
            self._weight_args = (q.data_ptr(), bias, self.out_features, self.in_features)
        elif self.mode == "int8" and self.act8:
            self._call = nk.q8a8_matmul
            self._weight_args = (q.data_ptr(), self.scale.data_ptr(), self.wsum128.data_ptr(),
                                 bias, self.out_features, self.in_features)
        elif self.mode == "int8":
            self._call = nk.q8_matmul
            self._weight_args = (q.data_ptr(), self.scale.data_ptr(), bias,
                                 self.out_features, self.in_features)
        elif self.act8:
            self._call = nk.q4a8_matmul
            self._weight_args = (q.data_ptr(), self.scale.data_ptr(), self.lo.data_ptr(), bias,
                                 self.out_features, self.in_features)
        else:
            self._call = nk.q4_matmul
            self._weight_args = (q.data_ptr(), self.scale.data_ptr(), self.lo.data_ptr(), bias,
                                 self.out_features, self.in_features, GROUP)
        self._macs = self.in_features * self.out_features

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        n_out = self.out_features
        y = torch.empty((m, n_out))
        # A tiny matmul on one thread: an OpenMP team's join costs more than its work
        threads = 1 if m * self._macs < SMALL_MATMUL else torch.get_num_threads()
        if self._call(x.data_ptr(), x.stride(0), m, *self._weight_args, y.data_ptr(), n_out,
                      threads):
            raise MemoryError(f"{self.mode} matmul: no memory for its scratch")
        return y


def quantize_model(model: nn.Module, mode: str, device: torch.device,
                   dtype: torch.dtype) -> None:
    """Swap every layer's projections for QuantizedProjection (in place). The C kernels
    are used on the CPU in fp32 when they build; otherwise the reference path (logged
    once)."""
    kernels = None
    if device.type == "cpu" and dtype == torch.float32:
        from server import native

        try:
            kernels = native.kernels()
        except native.NativeError as e:
            log.warning("--quantize %s computes with dequantized weights (slow): %s", mode, e)
        if kernels is not None and mode in ACT8_MODES:
            path = kernels.qa8_path()
            (log.info if path else log.warning)(
                "--quantize %s: integer dot products with %s", mode,
                ("plain C loops (no AVX2 here: slower than --quantize int8/int4)", "AVX2",
                 "AVX-512 VNNI")[path])
    else:
        log.info("--quantize %s on %s in %s: the weights are dequantized for each matmul "
                 "(the int8/int4 kernels are for the CPU in float32)", mode, device.type,
                 str(dtype).removeprefix("torch."))
    # The output projection (vocab x hidden: a fifth of the default model's weights) in
    # int8 for the 4-bit modes too (4 bits there cost the most quality; w4a8's is w8a8);
    # the model's lm_head (and with tied embeddings the input embeddings, the same tensor)
    # becomes its dequantized weight, so the model stays one set of weights (the tests'
    # oracle loads it).
    head_mode = "bf16" if mode == "bf16" else "w8a8" if mode in ACT8_MODES else "int8"
    head = QuantizedProjection(model.lm_head.detach().float(), None, head_mode, kernels)
    with torch.no_grad():
        model.lm_head.copy_(head.dequantized().to(model.lm_head.dtype))
    if kernels is not None or head.act8:  # (w8a8's head rounds its input, kernels or not)
        model.lm_head_q = head.to(device)
    for layer in model.layers:
        for name in _PROJECTIONS:
            proj = getattr(layer, name)
            weight = proj.weight.detach().float()
            bias = None if proj.bias is None else proj.bias.detach()
            qp = QuantizedProjection(weight, bias, mode, kernels).to(device)
            setattr(layer, name, qp)
