"""HostCache step by step: the host tier's byte budget, its LRU eviction order, what pins
an entry in host memory, reservations by other tiers and heap trimming. No threads, no
disk: entries are plain objects with the fields the cache reads."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.adapters.host_cache import HostCache
from server.adapters.lora import AdapterError


@dataclass
class W:
    nbytes: int


@dataclass(eq=False)
class Item:
    name: str
    weights: W | None
    last_used: float
    slot: int | None = None
    refs: int = 0


class Recorder:
    def __init__(self, budget: int) -> None:
        self.evictions = 0
        self.trims = 0
        self.cache = HostCache(budget, on_evict=self.evicted, release_heap=self.trimmed)

    def evicted(self) -> None:
        self.evictions += 1

    def trimmed(self) -> None:
        self.trims += 1


def names(items) -> list[str]:
    return [i.name for i in items]


def test_within_budget_nothing_is_evicted():
    r = Recorder(budget=100)
    items = [Item("a", W(40), 1.0), Item("b", W(60), 2.0)]
    assert r.cache.total(items) == 100
    assert r.cache.trim(items, items) == []
    assert [i.weights is not None for i in items] == [True, True]
    assert r.evictions == 0


def test_least_recently_used_goes_first_and_only_as_many_as_needed():
    r = Recorder(budget=100)
    a, b, c = Item("a", W(40), 3.0), Item("b", W(40), 1.0), Item("c", W(40), 2.0)
    items = [a, b, c]  # 120 bytes: one must go, the oldest (b)
    assert names(r.cache.trim(items, items)) == ["b"]
    assert b.weights is None and a.weights is not None and c.weights is not None
    assert r.evictions == 1
    assert r.cache.weights_bytes(items) == 80
    # Step 2: a new load of 70 bytes (150 in all); c (2.0) is older than a (3.0).
    d = Item("d", W(70), 4.0)
    items.append(d)
    assert names(r.cache.trim(items, items, keep=d)) == ["c", "a"]
    assert names(i for i in items if i.weights is not None) == ["d"]
    assert r.evictions == 3


def test_pinned_entries_and_keep_are_never_evicted():
    r = Recorder(budget=50)
    on_device = Item("dev", W(40), 0.0, slot=3)
    in_use = Item("used", W(40), 1.0, refs=1)
    just_loaded = Item("new", W(40), 2.0)
    free = Item("free", W(40), 3.0)
    items = [on_device, in_use, just_loaded, free]
    assert HostCache.pinned(on_device) and HostCache.pinned(in_use)
    assert not HostCache.pinned(free)
    # Over budget even after evicting everything it may: it evicts only `free`.
    assert names(r.cache.trim(items, items, keep=just_loaded)) == ["free"]
    assert names(i for i in items if i.weights is not None) == ["dev", "used", "new"]
    # Unpinned (the slot freed, the request ended): now evictable, oldest first.
    on_device.slot = None
    in_use.refs = 0
    assert names(r.cache.trim(items, items)) == ["dev", "used"]
    assert r.cache.weights_bytes(items) == 40


def test_retired_entries_on_the_device_count_but_are_not_candidates():
    r = Recorder(budget=100)
    live = [Item("a", W(60), 1.0)]
    retired = Item("a-old", W(60), 0.0, slot=0)  # replaced, its slot still in use
    assert r.cache.total(live + [retired]) == 120
    assert names(r.cache.trim(live, live + [retired])) == ["a"]


def test_reserve_evicts_for_another_tier_or_refuses_and_keeps_nothing():
    r = Recorder(budget=100)
    a, b = Item("a", W(30), 1.0), Item("b", W(30), 2.0, refs=1)
    items = [a, b]
    assert r.cache.reserve("onnx:x", 50, items, items)  # 110 -> evicts a
    assert a.weights is None and r.cache.reserved() == {"onnx:x": 50}
    assert r.cache.total(items) == 80
    # b is pinned: 80 + 30 > 100 cannot fit; nothing reserved, b kept.
    assert not r.cache.reserve("onnx:y", 30, items, items)
    assert r.cache.reserved() == {"onnx:x": 50} and b.weights is not None
    r.cache.release("onnx:x")
    r.cache.release("onnx:never")  # releasing an unknown key is harmless
    assert r.cache.reserved() == {} and r.cache.total(items) == 30
    assert r.cache.reserve("onnx:y", 70, items, items)


def test_heap_is_trimmed_once_enough_bytes_were_evicted():
    # Budget 800: a trim per 100 bytes evicted (an eighth of the budget).
    r = Recorder(budget=800)
    items = [Item(str(i), W(60), float(i)) for i in range(14)]  # 840 bytes
    r.cache.trim(items, items)  # evicts 60 (< 100): no trim yet
    assert (r.evictions, r.trims) == (1, 0)
    items.append(Item("x", W(60), 99.0))
    r.cache.trim(items, items)  # 120 evicted in all: one trim, the count starts over
    assert (r.evictions, r.trims) == (2, 1)
    items.append(Item("y", W(60), 100.0))
    r.cache.trim(items, items)
    assert (r.evictions, r.trims) == (3, 1)


def test_drop_gives_weights_back_and_trims_at_once():
    r = Recorder(budget=100)
    a = Item("a", W(10), 1.0)
    r.cache.drop(a)
    assert a.weights is None and r.trims == 1 and r.evictions == 0


def test_check_fits_names_the_adapter_and_the_budget():
    cache = HostCache(100)
    cache.check_fits("a", 100)
    with pytest.raises(AdapterError, match=r"adapter 'a' needs 101 bytes, more than the "
                       r"host adapter memory 100"):
        cache.check_fits("a", 101)
