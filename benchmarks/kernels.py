"""The engine's C kernels (server/native.py) against PyTorch's ops, in one process.

One engine step of the default model (fp32, this machine's threads), timed directly:
  * decode step of 32 rows (context 200 each), base model: native vs PyTorch ops;
  * the same step with 16 rank-16 all-projection LoRA adapters, 2 rows each: native
    (C LoRA kernel + native decode) vs PyTorch ops (batched bmm over the slot table);
    the in-process adapter overhead ratio (base step / adapter step) of each;
  * decode step of 1 row (context 100): native vs PyTorch ops;
  * the LoRA op alone over the 30 layers (all four projection groups), native vs torch;
    and the same 16 adapters spread over 4 tables of 4 slots (a step whose rows span 4
    rank buckets: one LoraHooks, so one kernel call or one batched op, per table).
Kinds are alternated, 3 steps each, --rounds times; medians are reported, and ratios
between kinds measured in the same rounds (this VM's speed drifts over minutes).

    python -m benchmarks.kernels [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import print_table, write_results
from server import native
from server.adapters.hooks import AdapterHooks
from server.adapters.lora import GROUPS, MODULES, LoraWeights, group_shapes
from server.adapters.slots import BatchedRows, LoraHooks, LoraSlotTable
from server.engine.engine import cpu_count
from server.engine.loading import load_model
from server.engine.model import KVCache, StepInputs
from server.engine.ops import TORCH_OPS, ModelOps
from server.model_store import provision_default_model

SLOTS, ROWS_PER_SLOT, RANK = 16, 2, 16


def _adapter(spec, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = group_shapes(spec)
    modules = {}
    for layer in range(spec.num_layers):
        for name, (group, idx) in MODULES.items():
            in_f, outs = shapes[group]
            modules[(layer, name)] = (torch.randn(RANK, in_f, generator=g) * 0.05,
                                      torch.randn(outs[idx], RANK, generator=g) * 0.05, 2.0)
    return LoraWeights(rank=RANK, alpha=2 * RANK, target_modules=list(MODULES),
                       modules=modules)


def _decode_inputs(rows: int, ctx: int) -> StepInputs:
    def t(values):
        return torch.tensor(values, dtype=torch.long)

    return StepInputs(input_ids=t([5] * rows), positions=t([ctx] * rows),
                      rows=t(range(rows)), decode_tok=t(range(rows)),
                      decode_rows=t(range(rows)), decode_lens=t([ctx + 1] * rows), prefill=[],
                      sample_idx=t(range(rows)), decode_n_rows=rows, decode_kv_len=ctx + 1)


def _time(fn, n: int = 3) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(cpu_count())
    kernels = native.kernels()
    native_ops = ModelOps(kernels, fused_decode=True)  # the engine's on an fp32 CPU
    model = load_model(provision_default_model(), torch.float32, torch.device("cpu"))
    spec = model.spec
    model.build_rope(512)
    batch = SLOTS * ROWS_PER_SLOT
    kv = KVCache(spec, batch, 512, torch.float32, "cpu")
    tables = {k: LoraSlotTable(spec, SLOTS, RANK, torch.float32, "cpu", k)
              for k in (kernels, None)}
    for slot in range(SLOTS):
        weights = _adapter(spec, slot)
        for table in tables.values():
            table.write(slot, weights)
    token_slots = [(i, i // ROWS_PER_SLOT) for i in range(batch)]
    segments = [(s, s * ROWS_PER_SLOT, (s + 1) * ROWS_PER_SLOT) for s in range(SLOTS)]
    # The same adapters in 4 tables of 4 slots (tokens in slot order as before).
    per, quarters = SLOTS // 4, {k: [] for k in (kernels, None)}
    for q in range(4):
        for k in (kernels, None):
            table = LoraSlotTable(spec, per, RANK, torch.float32, "cpu", k)
            for i in range(per):
                table.write(i, _adapter(spec, q * per + i))
            quarters[k].append(table)

    def split_hooks(native_path: bool) -> list[LoraHooks]:
        rows = per * ROWS_PER_SLOT
        if native_path:
            return [LoraHooks(t, [(i, q * rows + i * ROWS_PER_SLOT,
                                   q * rows + (i + 1) * ROWS_PER_SLOT) for i in range(per)])
                    for q, t in enumerate(quarters[kernels])]
        return [LoraHooks(t, [], BatchedRows.build(
            t, [(q * rows + j, j // ROWS_PER_SLOT) for j in range(rows)], batch, "cpu"))
            for q, t in enumerate(quarters[None])]

    def lora_hooks(native_path: bool) -> LoraHooks:
        if native_path:
            return LoraHooks(tables[kernels], segments)
        table = tables[None]
        return LoraHooks(table, [], BatchedRows.build(table, token_slots, batch, "cpu"))

    def step(rows: int, ctx: int, native_path: bool, adapters: bool):
        def run():
            model.use_ops(native_ops if native_path else TORCH_OPS)
            hooks = (AdapterHooks([lora_hooks(native_path)], [], tables[None].groups)
                     if adapters else None)
            model(_decode_inputs(rows, ctx), kv, hooks)
        return run

    shapes = group_shapes(spec)
    xs = {g: torch.randn(batch, shapes[g][0]) for g in GROUPS}
    outs = {g: torch.zeros(batch, sum(shapes[g][1])) for g in GROUPS}

    def lora_op(native_path: bool, n_tables: int = 1):
        hooks = [lora_hooks(native_path)] if n_tables == 1 else split_hooks(native_path)

        def run():
            for layer in range(spec.num_layers):
                for g in GROUPS:
                    for h in hooks:
                        h.linear(layer, g, xs[g], outs[g])
        return run

    kinds = {
        "step32_base_native": step(batch, 200, True, False),
        "step32_base_torch": step(batch, 200, False, False),
        "step32_lora_native": step(batch, 200, True, True),
        "step32_lora_torch": step(batch, 200, False, True),
        "step1_native": step(1, 100, True, False),
        "step1_torch": step(1, 100, False, False),
        "lora_op_native": lora_op(True),
        "lora_op_torch": lora_op(False),
        "lora_op_native_4_tables": lora_op(True, 4),
        "lora_op_torch_4_tables": lora_op(False, 4),
    }
    for native_path in (True, False):  # the split tables compute the same deltas
        got = []
        for n_tables in (1, 4):
            for o in outs.values():
                o.zero_()
            lora_op(native_path, n_tables)()
            got.append({g: o.clone() for g, o in outs.items()})
        for g in GROUPS:
            torch.testing.assert_close(got[1][g], got[0][g], rtol=1e-5, atol=1e-5)
    for fn in kinds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.rounds):
        for name, fn in kinds.items():
            times[name].append(_time(fn))
    ms = {f"{k}_ms": statistics.median(v) for k, v in times.items()}

    def ratio(num: str, den: str) -> float:
        return statistics.median(x / y for x, y in zip(times[num], times[den], strict=True))

    summary = {
        **ms,
        "step32_base_speedup": ratio("step32_base_torch", "step32_base_native"),
        "step32_lora_speedup": ratio("step32_lora_torch", "step32_lora_native"),
        "step1_speedup": ratio("step1_torch", "step1_native"),
        "lora_op_speedup": ratio("lora_op_torch", "lora_op_native"),
        "lora_op_4_tables_vs_1_native": ratio("lora_op_native_4_tables", "lora_op_native"),
        "lora_op_4_tables_vs_1_torch": ratio("lora_op_torch_4_tables", "lora_op_torch"),
        "overhead_ratio_native": ratio("step32_base_native", "step32_lora_native"),
        "overhead_ratio_torch": ratio("step32_base_torch", "step32_lora_torch"),
        "lora_table_mb": tables[None].nbytes / 1e6,
    }
    print_table(f"kernels (median of {a.rounds} rounds; {SLOTS} adapters rank {RANK}, "
                f"{ROWS_PER_SLOT} rows each)", list(summary.items()))
    path = write_results("kernels", {**summary, "settings": vars(a) | {
        "model": "smollm2-135m-instruct", "dtype": "float32", "kernels": str(kernels.path)}})
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
