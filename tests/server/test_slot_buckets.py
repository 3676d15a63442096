"""Slots bucketed by rank, step by step: which bucket an adapter takes, allocation on
first use, LRU eviction inside a full bucket only, the device-wide cap evicting across
buckets, pinned slots never taken, freeing, and the rank cap; the slot table is asserted
after each step."""

from __future__ import annotations

import pytest
import torch
from support import TINY_SPEC as SPEC
from support import RegistryWaiter, make_lora, wait_on_registry

from server.adapters.lora import AdapterError
from server.adapters.registry import AdapterRegistry
from server.adapters.slot_buckets import SlotBuckets, default_buckets, table_bytes

RANKS = {"a": 4, "b": 8, "c": 1, "x": 32, "y": 20, "big": 64}


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, r) in enumerate(RANKS.items()):
        make_lora(tiny_model, root / name, r=r, targets=["q_proj", "down_proj"], seed=i)
    return root


def registry(root, max_active: int) -> AdapterRegistry:
    """Two buckets: rank 8 with two slots (0, 1), rank 32 with one (2)."""
    table = SlotBuckets(SPEC, [(8, 2), (32, 1)], max_active, torch.float32, "cpu")
    reg = AdapterRegistry(root, SPEC, table, "fp", on_ready=RegistryWaiter())
    reg.scan()
    return reg


def pin(reg: AdapterRegistry, adapter_id: str) -> int | None:
    """acquire() and wait for the slot write it starts; None when every slot it could
    take is pinned."""
    entry = reg.get(adapter_id)
    reg.ensure_host(entry)
    wait_on_registry(reg, lambda: entry.weights is not None or entry.error, "host load")
    assert entry.weights is not None, entry.error
    slot = reg.acquire(entry)
    wait_on_registry(reg, lambda: slot is None or not entry.staging, "slot write")
    return slot


def lora(reg: AdapterRegistry) -> list:
    """Per LoRA slot: (adapter_id, refs) or None."""
    return [None if s is None else (s[0], s[2]) for s in reg.slot_table()[:3]]


def test_default_buckets_keep_each_table_within_the_old_one():
    assert default_buckets(128, 16) == ((8, 16), (16, 16), (32, 8), (64, 4), (128, 2))
    assert default_buckets(16, 16) == ((8, 16), (16, 16))  # the old default's 16 x rank 16
    assert default_buckets(24, 4) == ((8, 4), (16, 4), (24, 2))
    assert default_buckets(4, 3) == ((4, 3),)
    assert default_buckets(256, 1) == tuple((r, 1) for r in (8, 16, 32, 64, 128, 256))
    for rank, n in default_buckets(128, 16):  # none larger than 16 slots of rank 16
        assert table_bytes(SPEC, n, rank, torch.float32) <= table_bytes(SPEC, 16, 16,
                                                                        torch.float32)


def test_buckets_allocate_evict_and_free_step_by_step(root):
    reg = registry(root, max_active=3)
    table = reg.table
    assert [(b.rank, b.first, b.count) for b in table.buckets] == [(8, 0, 2), (32, 2, 1),
                                                                   (0, 3, 3)]
    assert table.max_rank == 32 and table.nbytes == 0 and table.tables == {}

    assert pin(reg, "a") == 0  # rank 4 -> the rank-8 bucket, whose table is made now
    assert lora(reg) == [("a", 1), None, None]
    assert list(table.tables) == [8] and table.nbytes == table_bytes(SPEC, 2, 8, torch.float32)
    assert pin(reg, "b") == 1
    assert pin(reg, "c") is None  # rank-8 bucket full and pinned; the rank-32 one is free
    assert lora(reg) == [("a", 1), ("b", 1), None]
    assert pin(reg, "x") == 2  # rank 32 -> the rank-32 bucket, allocated on first use
    assert lora(reg) == [("a", 1), ("b", 1), ("x", 1)]
    assert table.nbytes == (table_bytes(SPEC, 2, 8, torch.float32)
                            + table_bytes(SPEC, 1, 32, torch.float32)) == table.capacity_bytes
    local, index = table.locate(2)
    assert (local.max_rank, index) == (32, 0) and local.targets[0] != 0

    reg.release(reg.get("x"))
    reg.release(reg.get("a"))  # unpinned: x, then a (LRU order); both stay resident
    assert lora(reg) == [("a", 0), ("b", 1), ("x", 0)]
    assert pin(reg, "c") == 0  # evicts a, the LRU of ITS bucket, although x is older
    assert lora(reg) == [("c", 1), ("b", 1), ("x", 0)]
    assert reg.get("a").tier == "host" and reg.get("x").tier == "device"
    assert pin(reg, "y") == 2  # rank 20 -> rank-32 bucket, full: evicts x
    assert lora(reg) == [("c", 1), ("b", 1), ("y", 1)]
    assert pin(reg, "x") is None  # its bucket's one slot is pinned by y

    # Freeing: an unloaded adapter's slot is emptied and its table rows zeroed.
    reg.release(reg.get("c"))
    reg.unload("c")
    assert lora(reg) == [None, ("b", 1), ("y", 1)]
    t8, _ = table.locate(0)
    assert t8.targets[0] == 0 and all(b[:, 0].abs().sum() == 0 for b in t8.B.values())
    assert pin(reg, "a") == 0
    assert lora(reg) == [("a", 1), ("b", 1), ("y", 1)]

    # Above the largest bucket: refused at load, naming the rank and the limit.
    with pytest.raises(AdapterError, match="rank 64 is greater than max rank 32"):
        reg.load("big")


def test_the_device_cap_evicts_across_buckets_but_never_a_pinned_slot(root):
    reg = registry(root, max_active=2)  # 3 LoRA slots, at most 2 adapters on the device
    assert pin(reg, "a") == 0
    assert pin(reg, "x") == 2
    assert pin(reg, "b") is None  # a rank-8 slot is free, but 2 adapters are pinned
    assert lora(reg) == [("a", 1), None, ("x", 1)]
    assert "2 of 2 device adapters are pinned" in reg.slot_pressure(reg.get("b"))
    assert "1 of 2 rank-8 slots" in reg.slot_pressure(reg.get("b"))
    reg.release(reg.get("x"))
    assert pin(reg, "b") == 1  # the cap evicts x, the LRU unpinned one of another bucket
    assert lora(reg) == [("a", 1), ("b", 1), None] and reg.get("x").tier == "host"
