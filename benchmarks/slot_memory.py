"""Memory of the LoRA slot tables on the default model (fp32), from the real table
objects: the bytes of all their tensors after writing adapters into them.

  * before (one table, every slot at one rank): the old defaults, 16 slots of rank 16
    (--max-active-adapters 16 --max-lora-rank 16), holding 16 rank-8 adapters; and the
    table those flags need for one rank-128 adapter (--max-lora-rank 128).
  * after (slots bucketed by rank, default flags: buckets 8:16, 16:16, 32:8, 64:4,
    128:2, each allocated on first use): 16 rank-8 adapters; 16 rank-16 adapters;
    one adapter of each rank 8, 16, 32, 64 and 128 (every bucket allocated: the bound).

    python -m benchmarks.slot_memory
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig

from benchmarks.common import print_table, write_results
from server.adapters.lora import GROUPS, MODULES, LoraWeights, group_shapes
from server.adapters.slot_buckets import SlotBuckets, default_buckets, table_bytes
from server.adapters.slots import LoraSlotTable
from server.config import EngineConfig
from server.engine.loading import spec_from_hf_config
from server.engine.model import ModelSpec
from server.model_store import provision_default_model

MIB = 1 << 20


def lora(spec: ModelSpec, rank: int, seed: int) -> LoraWeights:
    """A random adapter of `rank` on all seven projections of every layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = group_shapes(spec)
    modules = {}
    for layer in range(spec.num_layers):
        for name, (group, idx) in MODULES.items():
            in_f, outs = shapes[group]
            modules[(layer, name)] = (torch.randn(rank, in_f, generator=g),
                                      torch.randn(outs[idx], rank, generator=g), 0.5)
    return LoraWeights(rank=rank, alpha=2 * rank, target_modules=list(MODULES),
                       modules=modules)


def buckets_with(spec: ModelSpec, ranks: list[int]) -> SlotBuckets:
    """The default-flag bucketed tables with one adapter of each of `ranks` written in,
    each in the next free slot of its bucket."""
    cfg = EngineConfig()
    slots = SlotBuckets(spec, default_buckets(cfg.max_lora_rank, cfg.max_active_adapters),
                        cfg.max_active_adapters, torch.float32, "cpu")
    used: set[int] = set()
    for i, rank in enumerate(ranks):
        weights = lora(spec, rank, i)
        bucket = slots.bucket_for(weights)
        slot = next(s for s in bucket.slots if s not in used)
        used.add(slot)
        slots.write(slot, weights)
    return slots


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.parse_args(argv)
    model_dir = provision_default_model()
    spec = spec_from_hf_config(AutoConfig.from_pretrained(model_dir))
    old = LoraSlotTable(spec, 16, 16, torch.float32, "cpu")
    for slot in range(16):
        old.write(slot, lora(spec, 8, slot))
    old_bytes = old.nbytes
    assert old_bytes == table_bytes(spec, 16, 16, torch.float32)  # the formula, checked
    del old
    new_rank8 = buckets_with(spec, [8] * 16)
    new_rank16 = buckets_with(spec, [16] * 16)
    every = buckets_with(spec, [8, 16, 32, 64, 128])
    assert every.nbytes == every.capacity_bytes
    result = {
        "model": str(model_dir), "dtype": "float32",
        "layers": spec.num_layers, "groups": list(GROUPS),
        "before_16_rank8_bytes": old_bytes,
        "before_flags": "--max-active-adapters 16 --max-lora-rank 16 (old defaults)",
        "before_for_one_rank128_bytes": table_bytes(spec, 16, 128, torch.float32),
        "before_for_one_rank128_flags": "--max-lora-rank 128 (16 slots of rank 128; "
                                        "computed from the table's shape, not allocated)",
        "after_buckets": every.describe(),
        "after_16_rank8_bytes": new_rank8.nbytes,
        "after_16_rank16_bytes": new_rank16.nbytes,
        "after_ranks_8_to_128_bytes": every.nbytes,
        "after_bound_bytes": every.capacity_bytes,
        "ratio_16_rank8_after_vs_before": new_rank8.nbytes / old_bytes,
    }
    print_table("LoRA slot tables, default model, fp32 (MiB)",
                [(k, v / MIB) for k, v in result.items() if k.endswith("_bytes")]
                + [("ratio 16 x rank 8, after / before",
                    result["ratio_16_rank8_after_vs_before"])])
    path = write_results("slot_memory", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
