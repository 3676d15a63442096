"""Device slots bucketed by LoRA rank: adapters of any rank up to the cap on one server,
each in a slot sized for its rank rather than for the largest one.

An adapter of rank r takes a slot of the smallest bucket whose rank is >= r (zero-padded
inside it, exact as in one table). Each bucket is its own `LoraSlotTable`, allocated
when its first adapter is written (a bucket no adapter uses costs nothing) and kept; the
native kernel, the segment op and the batched op run per table. After the LoRA buckets,
a range of slots without tables holds the other adapter types (IA3, bottleneck, soft
prompts), whose small device tensors are their own.

Slots are numbered globally, bucket after bucket in ascending rank, so a slot stays one
int everywhere (registry, request state, ListAdapters) and rows sorted by slot come
grouped by bucket:

    bucket b owns slots [b.first, b.first + b.count);  slot -> (b.table, slot - b.first)

Two bounds: at most `max_active` adapters on the device at once, whatever their type
(--max-active-adapters), and per bucket its own number of slots (--lora-slots; default
`default_buckets`: no bucket larger than max_active slots of rank 16, the old single
table), which bounds its memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server import native
from server.adapters.lora import AdapterError, LoraWeights, group_shapes
from server.adapters.slots import LoraSlotTable, group_modules
from server.engine.model import ModelSpec

BUCKET_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)


def default_buckets(max_rank: int, max_active: int) -> tuple[tuple[int, int], ...]:
    """(rank, slots) per bucket: ranks 8, 16, 32, ... below `max_rank`, then `max_rank`;
    min(max_active, max_active * 16 // rank) slots each (at least one), so no bucket
    takes more memory than max_active slots of rank 16 (16 slots: 8:16, 16:16, 32:8,
    64:4, 128:2)."""
    ranks = [r for r in BUCKET_RANKS if r < max_rank] + [max_rank]
    return tuple((r, max(1, min(max_active, max_active * 16 // r))) for r in ranks)


def table_bytes(spec: ModelSpec, num_slots: int, rank: int, dtype: torch.dtype) -> int:
    """Bytes of a LoraSlotTable of that shape (all its A and B tensors)."""
    shapes = group_shapes(spec)
    per_rank = sum(shapes[g][0] * len(mods) + sum(size for *_, size in mods)
                   for g, mods in group_modules(spec).items())
    return spec.num_layers * num_slots * rank * per_rank * torch.empty(0, dtype=dtype
                                                                        ).element_size()


@dataclass(frozen=True)
class Bucket:
    rank: int  # 0: the slots of adapters without LoRA tables
    first: int  # its slots are [first, first + count)
    count: int

    def __contains__(self, slot: int) -> bool:
        return self.first <= slot < self.first + self.count

    @property
    def slots(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def name(self) -> str:
        return f"rank-{self.rank}" if self.rank else "non-LoRA"


class SlotBuckets:
    def __init__(self, spec: ModelSpec, buckets: Sequence[tuple[int, int]], max_active: int,
                 dtype, device, kernel: native.Kernels | None = None) -> None:
        ranks = [r for r, _ in buckets]
        if not buckets or ranks != sorted(set(ranks)) or ranks[0] < 1:
            raise ValueError(f"lora slot buckets {list(buckets)} must be distinct ranks of "
                             "at least 1 in ascending order")
        if any(n < 1 for _, n in buckets) or max_active < 1:
            raise ValueError(f"lora slot buckets {list(buckets)} and max active adapters "
                             f"{max_active} must have at least one slot each")
        self.spec, self.dtype, self.device, self.kernel = spec, dtype, device, kernel
        self.max_active = max_active
        self.groups = group_modules(spec)
        self.buckets: list[Bucket] = []
        first = 0
        for rank, count in [*buckets, (0, max_active)]:
            self.buckets.append(Bucket(rank, first, count))
            first += count
        self.lora_buckets = self.buckets[:-1]
        self.other = self.buckets[-1]
        self.num_slots = first  # global slot ids 0 .. num_slots - 1
        self.max_rank = ranks[-1]
        self.tables: dict[int, LoraSlotTable] = {}  # rank -> table, once allocated
        self._alloc = threading.Lock()

    # ---- where adapters go --------------------------------------------------------
    def bucket_for(self, weights) -> Bucket:
        """The bucket of an adapter's weights (LoRA by rank, anything else `other`)."""
        if not isinstance(weights, LoraWeights):
            return self.other
        for bucket in self.lora_buckets:
            if weights.rank <= bucket.rank:
                return bucket
        raise AdapterError(f"LoRA rank {weights.rank} is greater than max rank "
                           f"{self.max_rank} (--max-lora-rank)")

    def bucket_of(self, slot: int) -> Bucket:
        for bucket in self.buckets:
            if slot in bucket:
                return bucket
        raise IndexError(f"slot {slot} is not one of the {self.num_slots} slots")

    def locate(self, slot: int) -> tuple[LoraSlotTable, int]:
        """The table and index inside it of a LoRA slot that has been written."""
        bucket = self.bucket_of(slot)
        return self.tables[bucket.rank], slot - bucket.first

    def check_fits(self, weights: LoraWeights, adapter_id: str) -> None:
        if weights.rank > self.max_rank:
            raise AdapterError(f"adapter {adapter_id!r} rank {weights.rank} is greater than "
                               f"max rank {self.max_rank} (--max-lora-rank)")

    # ---- slot writes (the registry's stager thread) -------------------------------
    def write(self, slot: int, weights: LoraWeights) -> None:
        bucket = self.bucket_of(slot)
        if bucket.rank < weights.rank:
            raise AdapterError(f"rank {weights.rank} does not fit slot {slot} of the "
                               f"{bucket.name} bucket")
        self._table(bucket).write(slot - bucket.first, weights)

    def clear(self, slot: int) -> None:
        bucket = self.bucket_of(slot)
        table = self.tables.get(bucket.rank)
        if table is not None:
            table.clear(slot - bucket.first)

    def _table(self, bucket: Bucket) -> LoraSlotTable:
        with self._alloc:
            table = self.tables.get(bucket.rank)
            if table is None:
                table = LoraSlotTable(self.spec, bucket.count, bucket.rank, self.dtype,
                                      self.device, self.kernel)
                self.tables[bucket.rank] = table  # visible once whole
            return table

    # ---- memory -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the tables allocated so far."""
        return sum(t.nbytes for t in list(self.tables.values()))

    @property
    def capacity_bytes(self) -> int:
        """Bytes once every bucket's table is allocated: the bound."""
        return sum(table_bytes(self.spec, b.count, b.rank, self.dtype)
                   for b in self.lora_buckets)

    def describe(self) -> str:
        return ", ".join(f"{b.rank}:{b.count}" for b in self.lora_buckets)

