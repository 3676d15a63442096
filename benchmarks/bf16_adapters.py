"""Adapter overhead in bf16 against fp32: one engine decode step, in process.

A 32-row decode step of the default model (context 200), base model only and with 16
rank-16 all-projection LoRA adapters (2 rows each; benchmarks.kernels' adapters), in fp32
(the engine's path there: the C decode and LoRA kernels) and in bf16 (the engine's path
there: PyTorch's ops, whose bf16 BLAS does 32 rows well, and the C LoRA kernel over bf16
slot tables). On one thread, timed by this thread's CPU time (the work a core does,
robust to other load on a shared machine); kinds alternated, median of --rounds.
Reported: ms a step and the adapter overhead ratio (base step time / adapter step time)
of each dtype.

    python -m benchmarks.bf16_adapters [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import print_table, write_results
from benchmarks.kernels import RANK, ROWS_PER_SLOT, SLOTS, _adapter, _decode_inputs
from server import native
from server.adapters.hooks import AdapterHooks
from server.adapters.slots import LoraHooks, LoraSlotTable
from server.engine.loading import load_model
from server.engine.model import KVCache
from server.engine.ops import ModelOps
from server.model_store import provision_default_model


def _steps(dtype: torch.dtype) -> dict:
    kernels = native.kernels()  # LoRA in both; the decode kernels are fp32 only
    model = load_model(provision_default_model(), dtype, torch.device("cpu"))
    spec = model.spec
    model.build_rope(512)
    # the engine's ops on this CPU with --cpu-kernels auto (the fp32 model's fused decode;
    # the bf16 model's few-row kernel)
    model.use_ops(ModelOps.pick("auto", torch.device("cpu"), dtype))
    batch = SLOTS * ROWS_PER_SLOT
    kv = KVCache(spec, batch, 512, dtype, "cpu")
    table = LoraSlotTable(spec, SLOTS, RANK, dtype, "cpu", kernels)
    for slot in range(SLOTS):
        table.write(slot, _adapter(spec, slot))
    lora = LoraHooks(table, [(s, s * ROWS_PER_SLOT, (s + 1) * ROWS_PER_SLOT)
                             for s in range(SLOTS)])
    hooks = AdapterHooks([lora], [], table.groups)
    inputs = _decode_inputs(batch, 200)
    return {"base": lambda: model(inputs, kv, None), "lora": lambda: model(inputs, kv, hooks)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    kinds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for k, fn in _steps(dtype).items():
            kinds[f"{name}_{k}"] = fn
    for fn in kinds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.rounds):
        for name, fn in kinds.items():
            t0 = time.thread_time()
            fn()
            times[name].append((time.thread_time() - t0) * 1e3)
    ms = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    ratios = {f"{d}_adapter_overhead_ratio": ms[f"{d}_base_ms"] / ms[f"{d}_lora_ms"]
              for d in ("fp32", "bf16")}
    ratios["bf16_over_fp32_step_time"] = ms["bf16_base_ms"] / ms["fp32_base_ms"]
    print_table("32-row decode step, 16 rank-16 adapters, one thread (CPU ms)",
                [*ms.items(), *ratios.items()])
    result = {**ms, **ratios, "rounds": a.rounds, "settings": {
        "rows": SLOTS * ROWS_PER_SLOT, "adapters": SLOTS, "rank": RANK, "context": 200,
        "threads": 1, "clock": "thread CPU time", "model": "smollm2-135m-instruct"}}
    path = write_results("bf16_adapters", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
