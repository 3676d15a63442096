"""Weight-only quantized matmul kernels on this CPU, for the base model's projections.

One projection y = x @ W^T (W [out, in]) at the default model's shapes (SmolLM2-135M:
hidden 576, intermediate 1536; fused qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576) and a 2048x2048 one, for M = 1 row (a decode step of one stream) and
M = 32 rows (a batch), each call on the next of several copies of the weights (128 MB of
them in fp32: read from memory, not the cache, as in a decode step), each candidate timed
in the same rounds (alternated, this VM's
speed drifts), the median of --rounds rounds of up to --reps calls (fewer for
the slow ones: about 20 ms a round):
  * fp32: `x @ W^T` with W stored [in, out] (server.engine.model.Projection) and
    `F.linear` (W [out, in]);
  * int8: `torch._weight_int8pack_mm` (per-output-channel symmetric int8, x in fp32
    and in bf16);
  * int4: `torch._weight_int4pack_mm_for_cpu` (asymmetric 4-bit per group of 32, 64, 128
    input channels, x in fp32 and bf16);
  * this project's C kernels (server/csrc/quant.c): int8 per channel, int4 per group of
    32 and 64, on 1 thread and on all (what won, see docs/performance.md);
  * bitsandbytes int8 and nf4 (the engine's quantized projections before this benchmark);
  * 8-bit activations (`--quantize w8a8|w4a8`): `torch._int_mm` (oneDNN's int8 GEMM, x
    already int8: the matmul alone) and this project's server/csrc/qa8.c (the rounding of
    x included), int8 per channel and int4 per group of 32;
  * bf16 weights through oneDNN's pre-packed copy (`--quantize bf16`'s batch path).
Reported: microseconds a call, the weight bytes read a second (GB/s), and each one's
speed-up over fp32 `x @ W^T` at the same shape and M.

With --clock cpu every candidate runs on one thread and is timed by this thread's CPU
time: the work a core does, robust to other processes on a shared machine (wall-clock
medians there land on multiples of the scheduler's time slice).

    python -m benchmarks.quant_kernels [--rounds 7] [--reps 50] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, write_results
from server import native
from server.engine.quant import (
    QuantizedProjection,
    linear_packed,
    pack_weight,
    quantize_int4,
    quantize_int8,
)

SHAPES = {  # name: (in_features, out_features)
    "qkv 576->960": (576, 960),
    "o 576->576": (576, 576),
    "gate_up 576->3072": (576, 3072),
    "down 1536->576": (1536, 576),
    "2048->2048": (2048, 2048),
}
GROUPS = (32, 64, 128)
COPIES_BYTES = 128 << 20


def quantize_int4_torch(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group` inputs in PyTorch's CPU int4 format:
    w ~= (q - 8) * scale + zero; returns (packed weight, scales_and_zeros [in/g, out, 2])."""
    out_f, in_f = w.shape
    wg = w.view(out_f, in_f // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.view(out_f, in_f), 1)
    zero = lo + 8 * scale
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """name: (a call computing one projection of x's rows, weight bytes it reads)."""
    out_f, in_f = w.shape
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    w_t = w.T.contiguous()
    q8, s8 = quantize_int8(w)
    s8b = s8.to(torch.bfloat16)
    found = {
        "fp32 x @ W^T [in,out]": (lambda: x @ w_t, w.numel() * 4),
        "fp32 F.linear [out,in]": (lambda: F.linear(x, w), w.numel() * 4),
        "int8 _weight_int8pack_mm fp32": (lambda: torch._weight_int8pack_mm(x, q8, s8),
                                          w.numel() + out_f * 4),
        "int8 _weight_int8pack_mm bf16": (lambda: torch._weight_int8pack_mm(xb, q8, s8b),
                                          w.numel() + out_f * 2),
    }
    x8, q8t = torch.randint(-127, 128, (max(m, 17), in_f), dtype=torch.int8), q8.T.contiguous()
    found["w8a8 torch._int_mm (oneDNN; x int8, 17+ rows)"] = (lambda: torch._int_mm(x8, q8t),
                                                            w.numel())
    wb = w.to(torch.bfloat16)
    wb_packed = pack_weight(wb)
    if wb_packed is not None:
        found["bf16 oneDNN pre-packed (bf16 x)"] = (lambda: linear_packed(xb, wb, wb_packed),
                                                    w.numel() * 2)
    for g in (g for g in GROUPS if in_f % g == 0):  # 576 is no multiple of 128
        packed, sz = quantize_int4_torch(w, g)
        szb = sz.to(torch.bfloat16)
        nbytes = w.numel() // 2 + sz.numel() * 4
        found[f"int4 g{g} _weight_int4pack_mm fp32"] = (
            lambda p=packed, s=sz, g=g: torch._weight_int4pack_mm_for_cpu(x, p, g, s), nbytes)
        found[f"int4 g{g} _weight_int4pack_mm bf16"] = (
            lambda p=packed, s=szb, g=g: torch._weight_int4pack_mm_for_cpu(xb, p, g, s),
            nbytes)
    try:
        nk = native.kernels()
    except native.NativeError:
        nk = None
    if nk is not None:
        q8, s8 = quantize_int8(w)
        y = torch.empty(m, out_f)
        for th in sorted({1, torch.get_num_threads()}):
            found[f"fp32 native f32_matmul [out,in] {th}t"] = (
                lambda th=th: nk.f32_matmul(x.data_ptr(), in_f, m, w.data_ptr(), None, out_f,
                                            in_f, y.data_ptr(), out_f, th), w.numel() * 4)
            found[f"int8 native server/csrc/quant.c {th}t"] = (
                lambda th=th: nk.q8_matmul(x.data_ptr(), in_f, m, q8.data_ptr(), s8.data_ptr(),
                                           None, out_f, in_f, y.data_ptr(), out_f, th),
                w.numel() + out_f * 4)
            for mode, nbytes in (("w8a8", w.numel() + out_f * 4),
                                 ("w4a8", w.numel() // 2 + w.numel() // 32 * 8)):
                proj = QuantizedProjection(w, None, mode, nk)  # (the lambda keeps it alive)
                found[f"{mode} native server/csrc/qa8.c {th}t"] = (
                    lambda proj=proj, th=th: proj._call(
                        x.data_ptr(), in_f, m, *proj._weight_args, y.data_ptr(), out_f, th),
                    nbytes)
            for g in (32, 64):
                packed, scale, lo = quantize_int4(w, g)
                nbytes = w.numel() // 2 + scale.numel() * 8
                found[f"int4 g{g} native server/csrc/quant.c {th}t"] = (
                    lambda p=packed, s=scale, lo=lo, g=g, th=th: nk.q4_matmul(
                        x.data_ptr(), in_f, m, p.data_ptr(), s.data_ptr(), lo.data_ptr(),
                        None, out_f, in_f, g, y.data_ptr(), out_f, th), nbytes)
    try:
        import bitsandbytes as bnb

        lin8 = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False,
                                   threshold=0.0)
        lin8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False,
                                        has_fp16_weights=False)
        lin4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32,
                                 quant_type="nf4")
        lin4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        lin8, lin4 = lin8.to("cpu"), lin4.to("cpu")
        found["int8 bitsandbytes Linear8bitLt"] = (lambda: lin8(x), w.numel() + out_f * 4)
        found["nf4 bitsandbytes Linear4bit"] = (lambda: lin4(x), w.numel() // 2)
    except ImportError:
        pass
    return found


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def _time(fn: Callable[[], object], reps: int) -> float:
    t0 = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - t0) / reps


def rotating(w: torch.Tensor, m: int) -> dict[str, tuple[Callable[[], object], int]]:
    """candidates() over enough copies of w (COPIES_BYTES of fp32 weights, far over the
    L3 cache) that each call reads its weights from memory, as a decode step does (the
    model's fp32 weights are 540 MB, int4's about 90)."""
    copies = max(2, -(-COPIES_BYTES // (w.numel() * 4)))
    x = torch.randn(m, w.shape[1])
    sets = [candidates(w + 1e-4 * i, x) for i in range(copies)]
    found = {}
    for name, (_, nbytes) in sets[0].items():
        fns = [s[name][0] for s in sets]
        it = itertools.cycle(fns)
        found[name] = (lambda it=it: next(it)(), nbytes)
    return found


@torch.inference_mode()
def measure(rounds: int, reps: int) -> dict:
    results: dict = {}
    for shape, (in_f, out_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.05
        for m in (1, 32):
            cands = rotating(w, m)
            # warm up (packing, threads); the slow ones get fewer calls a round
            n_calls = {name: max(1, min(reps, int(0.02 / _time(fn, 3))))
                       for name, (fn, _) in cands.items()}
            times: dict[str, list[float]] = {name: [] for name in cands}
            for _ in range(rounds):
                for name, (fn, _) in cands.items():
                    times[name].append(_time(fn, n_calls[name]))
            base = statistics.median(times["fp32 x @ W^T [in,out]"])
            rows = {}
            for name, (_, nbytes) in cands.items():
                t = statistics.median(times[name])
                rows[name] = {"us": round(t * 1e6, 2), "weight_gb_s": round(nbytes / t / 1e9, 2),
                              "speedup_vs_fp32": round(base / t, 3)}
            results[f"{shape} M={m}"] = rows
            del cands
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this thread's CPU time, every candidate on one thread (torch's "
                   "included): the work a core does, whatever else the machine runs "
                   "(results in quant_kernels-cpu.json)")
    a = p.parse_args(argv)
    if a.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    results = measure(a.rounds, a.reps)
    for key, rows in results.items():
        print_table(f"{key}: us a call (speed-up over fp32 x @ W^T)",
                    [(name, f"{r['us']:9.1f} ({r['speedup_vs_fp32']:.2f}x)")
                     for name, r in rows.items()])
    write_results("quant_kernels" + ("-cpu" if a.clock == "cpu" else ""),
                  {"rounds": a.rounds, "reps": a.reps, "clock": a.clock, "results": results})


if __name__ == "__main__":
    main()
