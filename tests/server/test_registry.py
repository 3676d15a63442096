"""Registry state, step by step: register, load, activate, evict, pin, swap, and the slot
table after each step; host LRU in bytes; background loads; disk sync."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from support import TINY_SPEC as SPEC
from support import RegistryWaiter, make_lora, wait_on_registry

from server.adapters.lora import AdapterError
from server.adapters.registry import AdapterNotFoundError, AdapterRegistry
from server.adapters.slot_buckets import SlotBuckets


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate("abcd"):
        make_lora(tiny_model, root / name, r=4, targets=["q_proj", "v_proj"], seed=i)
    return root


def registry(root, slots=2, **kw) -> AdapterRegistry:
    """One rank-8 bucket of `slots` slots, as many adapters on the device at most."""
    table = SlotBuckets(SPEC, [(8, slots)], max_active=slots, dtype=torch.float32,
                        device="cpu")
    kw.setdefault("on_ready", RegistryWaiter())
    return AdapterRegistry(root, SPEC, table, "fp", **kw)


def lora_slots(reg: AdapterRegistry) -> list:
    """The registry's slot table, LoRA buckets only (the non-LoRA range left out)."""
    return reg.slot_table()[: reg.table.other.first]


def pin(reg: AdapterRegistry, entry) -> int | None:
    """acquire(), then wait for the slot write that it starts on the stager thread; None
    at once when every slot is pinned."""
    slot = reg.acquire(entry)
    wait_on_registry(reg, lambda: slot is None or not entry.staging, "slot write")
    return slot


def test_load_activate_evict_pin_swap(root):
    reg = registry(root, slots=2)
    assert reg.scan() == []
    assert [(e.adapter_id, e.tier) for e in reg.entries()] == [
        ("a", "disk"), ("b", "disk"), ("c", "disk"), ("d", "disk")]
    a, _ = reg.load("a")
    b, _ = reg.load("b")
    c, _ = reg.load("c")
    assert (a.tier, b.tier, c.tier) == ("host", "host", "host")
    assert lora_slots(reg) == [None, None]

    assert pin(reg, a) == 0  # activate: a free slot, pinned
    assert lora_slots(reg) == [("a", "2", 1), None]
    assert pin(reg, b) == 1
    assert lora_slots(reg) == [("a", "2", 1), ("b", "2", 1)]
    assert pin(reg, c) is None  # every slot pinned: c waits
    assert pin(reg, a) == 0  # a second request shares a's slot
    assert lora_slots(reg) == [("a", "2", 2), ("b", "2", 1)]

    reg.release(b)  # b unpinned, still resident
    assert lora_slots(reg) == [("a", "2", 2), ("b", "2", 0)] and b.tier == "device"
    assert pin(reg, c) == 1  # evicts b, the least recently used unpinned slot
    assert lora_slots(reg) == [("a", "2", 2), ("c", "2", 1)] and b.tier == "host"

    # Swap a while two requests run on it: the old version keeps its slot until they end.
    a2, replaced = reg.load("a")
    assert replaced and a2.version == "3" and reg.get("a") is a2
    assert lora_slots(reg) == [("a", "2", 2), ("c", "2", 1)]
    reg.release(a)
    reg.release(a)  # the old version's last request ends: its slot is freed
    assert lora_slots(reg) == [None, ("c", "2", 1)] and a.slot is None
    assert pin(reg, a2) == 0
    assert lora_slots(reg) == [("a", "3", 1), ("c", "2", 1)]

    reg.unload("c")  # unloaded while running: gone from the list, slot kept until release
    with pytest.raises(AdapterNotFoundError):
        reg.get("c")
    assert lora_slots(reg) == [("a", "3", 1), ("c", "2", 1)]
    reg.release(c)
    assert lora_slots(reg) == [("a", "3", 1), None]


def test_host_lru_is_bounded_in_bytes(root):
    probe = registry(root)
    one = probe.load("a")[0].weights.nbytes
    reg = registry(root, host_bytes=2 * one + one // 2)  # room for two
    reg.scan()
    a, _ = reg.load("a")
    b, _ = reg.load("b")
    a.last_used, b.last_used = 1.0, 2.0
    c, _ = reg.load("c")  # evicts a, the least recently used
    assert (a.tier, b.tier, c.tier) == ("disk", "host", "host")
    assert reg.host_usage() == 2 * one
    slot = pin(reg, b)
    d, _ = reg.load("d")  # b is on the device, so c is evicted instead
    assert slot == 0 and (b.tier, c.tier, d.tier) == ("device", "disk", "host")


def test_other_tiers_share_the_host_budget(root):
    """An ONNX session's bytes count in the budget: unused adapter weights make room."""
    probe = registry(root)
    one = probe.load("a")[0].weights.nbytes
    reg = registry(root, host_bytes=2 * one + one // 2)
    reg.scan()
    a, _ = reg.load("a")
    b, _ = reg.load("b")
    a.last_used, b.last_used = 1.0, 2.0
    assert reg.reserve_host("onnx:x", one)  # a (least recently used) leaves the host
    assert (a.tier, b.tier) == ("disk", "host")
    assert not reg.reserve_host("onnx:y", 2 * one)  # b alone cannot make that room...
    assert b.tier == "disk"  # ... though it was evicted trying
    reg.release_host("onnx:x")
    assert reg.reserve_host("onnx:y", 2 * one)
    c, _ = reg.load("c")  # the session holds 2 of 2.5: loading c evicts nothing it can't
    assert reg.host_usage() == one and c.tier == "host"


def test_background_load_and_failure(root, tmp_path):
    work = tmp_path / "root"
    shutil.copytree(root, work)
    (work / "d" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # corrupt
    ready = threading.Event()
    reg = registry(work, on_ready=ready.set)
    reg.scan()
    a = reg.get("a")
    assert reg.ensure_host(a) is False  # starts loading on a loader thread
    assert ready.wait(30) and a.tier == "host" and reg.ensure_host(a)
    ready.clear()
    d = reg.get("d")
    assert reg.ensure_host(d) is False
    assert ready.wait(30)
    assert d.tier == "disk" and "corrupt or truncated" in d.error
    assert reg.get("b").tier == "disk"  # other adapters unaffected


def test_sync_with_disk_adds_changes_and_removes(root, tmp_path):
    work = tmp_path / "root"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("d"))
    reg = registry(work)
    reg.scan()
    assert sorted(e.adapter_id for e in reg.entries()) == ["a", "b", "c"]
    shutil.copytree(root / "d", work / "d")
    shutil.rmtree(work / "b")
    time.sleep(0.01)
    shutil.copy(root / "d" / "adapter_model.safetensors", work / "a")  # a changes content
    changes = reg.sync_with_disk()
    assert changes == {"added": ["d"], "changed": ["a"], "removed": ["b"]}
    assert reg.get("a").version == "2" and reg.get("a").tier == "host"
    assert reg.sync_with_disk() == {"added": [], "changed": [], "removed": []}


def test_rank_over_limit_and_escape_refused(root, tmp_path):
    reg = registry(root)
    reg.table.max_rank = 2
    with pytest.raises(AdapterError, match="rank 4 is greater than max rank 2"):
        reg.load("a")
    with pytest.raises(AdapterError, match="outside the adapter root"):
        reg.load("x", "../../")
    work = tmp_path / "root"
    shutil.copytree(root, work)
    (work / "evil").symlink_to(tmp_path)  # a symlink inside the root pointing out of it
    with pytest.raises(AdapterError, match="outside the adapter root"):
        registry(work).load("x", "evil")


def test_a_slot_written_for_a_waiting_request_stays_its_own(root):
    """The slot reserved for a request is pinned from the moment it is reserved: another
    request cannot evict it while it is written, nor between the write and the start of
    the request that asked for it (once, waiting requests stole each other's freshly
    written slots over and over: 3333 slot writes for 96 requests)."""
    reg = registry(root, slots=1)
    reg.scan()
    a, _ = reg.load("a")
    b, _ = reg.load("b")
    assert reg.acquire(a) == 0  # reserved and pinned from now on, written meanwhile
    assert reg.acquire(b) is None
    assert pin(reg, a) == 0 and not a.staging  # a second request on a shares the slot
    assert lora_slots(reg) == [("a", "2", 2)]
    assert reg.acquire(b) is None  # written, but still pinned for its requests
    reg.release(a)
    reg.release(a)
    assert lora_slots(reg) == [("a", "2", 0)]
    assert pin(reg, b) == 0 and lora_slots(reg) == [("b", "2", 1)]

    # A request that ends (deadline, cancel) while its slot is written unpins it: once
    # written, the slot can be evicted like any unused one.
    reg.release(b)
    c, _ = reg.load("c")
    assert reg.acquire(c) == 0
    reg.release(c)
    wait_on_registry(reg, lambda: not c.staging, "slot write")
    assert lora_slots(reg) == [("c", "2", 0)] and c.tier == "device"
    assert pin(reg, a) == 0 and lora_slots(reg) == [("a", "2", 1)]


def test_evictions_and_resident_adapters_are_counted_per_tier(root):
    """The metrics the registry reports as adapters move between tiers."""
    probe = registry(root)
    one = probe.load("a")[0].weights.nbytes
    reg = registry(root, slots=1, host_bytes=2 * one + one // 2)
    m = reg.metrics.registry

    def value(name, tier):
        return m.get_sample_value(name, {"tier": tier}) or 0.0

    def resident():
        return [value("switchboard_adapters_resident", t) for t in ("disk", "host", "device")]

    reg.scan()
    assert resident() == [4, 0, 0]
    a, _ = reg.load("a")
    b, _ = reg.load("b")
    a.last_used, b.last_used = 1.0, 2.0
    assert resident() == [2, 2, 0]
    reg.load("c")  # a leaves host memory
    assert value("switchboard_adapter_evictions_total", "host") == 1
    assert value("switchboard_adapter_loads_total", "host") == 3
    assert resident() == [2, 2, 0]
    assert pin(reg, b) == 0
    assert value("switchboard_adapter_loads_total", "device") == 1
    assert resident() == [2, 1, 1]
    reg.release(b)
    c = reg.get("c")
    assert pin(reg, c) == 0  # the one slot: b (unpinned) is evicted from the device
    assert value("switchboard_adapter_evictions_total", "device") == 1
    assert value("switchboard_adapter_loads_total", "device") == 2
    reg.release(c)
    reg.unload("c")  # on the device, unpinned: freed at once
    assert reg.slot_table()[0] is None and c.tier == "disk"
    assert value("switchboard_adapter_evictions_total", "device") == 1
    assert resident() == [2, 1, 0]
