"""SlotManager step by step: reserving, pinning, unpinning, the LRU of unpinned slots,
eviction from a full bucket or at max_active, retired entries freed when unpinned, and a
failed slot write. No threads, no device: a fake table records the slots cleared."""
from __future__ import annotations

from dataclasses import dataclass

from server.adapters.lora import AdapterError
from server.adapters.slot_buckets import Bucket
from server.adapters.slot_manager import SlotManager


@dataclass
class W:
    rank: int  # 0: not LoRA (the non-LoRA range)


class FakeTable:
    """Two rank-8 slots (0, 1), one rank-16 slot (2), two non-LoRA slots (3, 4)."""

    def __init__(self, max_active: int) -> None:
        self.buckets = [Bucket(8, 0, 2), Bucket(16, 2, 1), Bucket(0, 3, 2)]
        self.num_slots = 5
        self.max_active = max_active
        self.cleared: list[int] = []

    def bucket_for(self, weights) -> Bucket:
        if weights.rank == 0:
            return self.buckets[2]
        for b in self.buckets[:2]:
            if weights.rank <= b.rank:
                return b
        raise AdapterError("too large")

    def clear(self, slot: int) -> None:
        self.cleared.append(slot)


@dataclass(eq=False)
class Entry:
    adapter_id: str
    weights: W | None
    version: str = "1"
    device_weights: object = None
    slot: int | None = None
    refs: int = 0
    staging: bool = False
    retired: bool = False
    error: str | None = None


class Harness:
    def __init__(self, max_active: int = 5) -> None:
        self.table = FakeTable(max_active)
        self.evictions = 0
        self.freed_retired: list[str] = []
        self.m = SlotManager(self.table, on_evict=self.evicted,
                             on_free_retired=lambda e: self.freed_retired.append(e.adapter_id))

    def evicted(self) -> None:
        self.evictions += 1

    def staged(self, entry: Entry) -> int:
        """acquire + the slot written: the entry pinned on the device."""
        slot, new = self.m.acquire(entry)
        assert new and entry.staging
        self.m.staged(entry)
        return slot

    def ids(self) -> list[str | None]:
        return [None if s is None else s[0] for s in self.m.table_view()]


def test_acquire_reserves_a_slot_of_the_bucket_then_pins_it():
    h = Harness()
    a = Entry("a", W(8))
    assert h.m.acquire(a) == (0, True)
    assert a.slot == 0 and a.staging and a.refs == 1
    assert h.ids() == ["a", None, None, None, None]
    assert h.m.eviction_order() == []  # reserved: neither free nor evictable
    h.m.staged(a)
    assert not a.staging and h.m.eviction_order() == []  # still pinned by its request
    assert h.m.acquire(a) == (0, False) and a.refs == 2  # a second request: same slot
    assert h.m.busy() == 1 and h.m.occupied() == 1
    h.m.release(a)
    assert h.m.eviction_order() == []
    h.m.release(a)
    assert a.refs == 0 and h.m.eviction_order() == [0] and h.m.busy() == 0
    assert h.m.acquire(a) == (0, False) and h.m.eviction_order() == []  # pinned again


def test_an_entry_not_in_host_memory_gets_nothing():
    h = Harness()
    a = Entry("a", None)
    assert h.m.acquire(a) == (None, False)
    assert a.refs == 0 and h.ids() == [None] * 5


def test_types_go_to_their_own_bucket():
    h = Harness()
    assert h.staged(Entry("r16", W(12))) == 2
    assert h.staged(Entry("ia3", W(0))) == 3
    assert h.staged(Entry("r8", W(4))) == 0
    assert h.ids() == ["r8", None, "r16", "ia3", None]


def test_a_full_bucket_evicts_its_least_recently_unpinned_adapter():
    h = Harness()
    a, b, c = Entry("a", W(8)), Entry("b", W(8)), Entry("c", W(8))
    h.staged(a), h.staged(b)
    h.m.release(b)
    h.m.release(a)  # unpinned b first, then a: b is evicted first
    assert h.m.eviction_order() == [1, 0]
    assert h.m.acquire(c) == (1, True)
    assert b.slot is None and h.table.cleared == [1] and h.evictions == 1
    assert h.ids() == ["a", "c", None, None, None] and h.m.eviction_order() == [0]


def test_a_pinned_bucket_makes_the_request_wait():
    h = Harness()
    a, b, c = Entry("a", W(8)), Entry("b", W(8)), Entry("c", W(8))
    h.staged(a), h.staged(b)
    assert h.m.acquire(c) == (None, False)
    assert c.refs == 0 and c.slot is None and h.evictions == 0
    # Another bucket's unpinned adapter does not help a full bucket.
    d = Entry("d", W(16))
    h.staged(d)
    h.m.release(d)
    assert h.m.acquire(c) == (None, False) and d.slot == 2
    h.m.release(a)
    assert h.m.acquire(c) == (0, True) and h.evictions == 1


def test_at_max_active_any_bucket_gives_up_its_least_recently_used():
    h = Harness(max_active=2)
    a, b, c = Entry("a", W(8)), Entry("b", W(16)), Entry("c", W(0))
    h.staged(a), h.staged(b)
    assert h.m.acquire(c) == (None, False)  # both pinned
    h.m.release(b)
    h.m.release(a)
    assert h.m.acquire(c) == (3, True)  # b (slot 2) went: the least recently unpinned
    assert b.slot is None and h.table.cleared == [2] and h.evictions == 1
    assert h.ids() == ["a", None, None, "c", None]


def test_a_retired_entry_is_freed_when_its_last_request_ends():
    h = Harness()
    a = Entry("a", W(8), device_weights="tensors")
    h.staged(a)
    h.m.acquire(a)  # two requests
    a.retired = True  # replaced meanwhile
    h.m.release(a)
    assert a.slot == 0 and h.freed_retired == []
    h.m.release(a)
    assert a.slot is None and a.device_weights is None
    assert h.freed_retired == ["a"] and h.table.cleared == [0]
    assert h.m.eviction_order() == [] and h.evictions == 0


def test_a_slot_written_after_its_requests_ended_is_unpinned_or_freed():
    h = Harness()
    a, b = Entry("a", W(8)), Entry("b", W(8))
    assert h.m.acquire(a) == (0, True)
    assert h.m.acquire(b) == (1, True)
    h.m.release(a)  # the request ended while its slot was being written
    h.m.release(b)
    assert h.m.eviction_order() == []  # staging: neither is evictable yet
    h.m.staged(a)
    assert h.m.eviction_order() == [0]
    b.retired = True
    h.m.staged(b)
    assert b.slot is None and h.freed_retired == ["b"] and h.m.eviction_order() == [0]


def test_a_failed_write_frees_the_slot_and_records_the_error():
    h = Harness()
    a = Entry("a", W(8))
    h.m.acquire(a)
    h.m.stage_failed(a, "writing its device slot failed: OSError: x")
    assert a.slot is None and not a.staging
    assert a.error == "writing its device slot failed: OSError: x"
    assert h.ids() == [None] * 5 and h.table.cleared == [0] and h.m.eviction_order() == []


def test_pressure_names_pinned_slots_device_wide_and_in_the_bucket():
    h = Harness(max_active=4)
    h.staged(Entry("a", W(8)))
    h.staged(Entry("b", W(0)))
    assert h.m.pressure(Entry("c", W(8))) == (
        "2 of 4 device adapters are pinned by running requests (--max-active-adapters); "
        "1 of 2 rank-8 slots (--lora-slots)")
    assert h.m.pressure(Entry("d", W(64))) == (
        "2 of 4 device adapters are pinned by running requests (--max-active-adapters)")
