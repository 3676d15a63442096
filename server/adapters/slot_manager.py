"""Which entry holds which device slot, which slots are pinned, which one is evicted next.

`SlotManager` decides, and does nothing else: no threads, no lock of its own (the
registry calls it under its lock), and of the device only `table.clear(slot)` when a slot
is freed. Writing a slot (the stager thread) stays the registry's: `acquire` reserves a
slot and marks the entry `staging`, `staged` or `stage_failed` ends that.

A slot is pinned while a request uses its entry (`refs`), and while it is being written
(the pin taken by `acquire` keeps it for the request that asked). Unpinned occupied slots
wait in an LRU and are evicted, least recently unpinned first: from the bucket that is
full, or from any bucket when the device holds `table.max_active` adapters. A pinned
slot is never taken: `acquire` returns None and the request waits instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from server.adapters.lora import AdapterError


class SlotItem(Protocol):
    """What the manager reads and sets of an entry (registry.AdapterEntry)."""
    weights: Any  # host weights: the bucket is chosen by them
    device_weights: Any
    slot: int | None
    refs: int
    staging: bool
    retired: bool
    error: str | None


class SlotManager:
    def __init__(self, table, *, on_evict: Callable[[], None] = lambda: None,
                 on_free_retired: Callable[[Any], None] = lambda entry: None) -> None:
        """`table`: the SlotBuckets (num_slots, max_active, bucket_for, clear).
        `on_evict`: called once per unpinned entry evicted to make room (the metric).
        `on_free_retired`: called with a retired entry whose slot was freed, to give its
        host weights back."""
        self.table = table
        self.on_evict = on_evict
        self.on_free_retired = on_free_retired
        self._slots: list[Any | None] = [None] * table.num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned occupied slots

    # ---- what the registry asks ------------------------------------------------
    def acquire(self, entry: SlotItem) -> tuple[int | None, bool]:
        """(slot, new): pin the slot holding the entry (new False), or reserve a free
        (or evicted) one for it (new True: the entry is `staging` and pinned until the
        caller writes the slot and calls `staged`). (None, False), nothing pinned, when
        the entry is not in host memory or every slot it could take is pinned."""
        if entry.slot is not None:
            entry.refs += 1
            self._lru.pop(entry.slot, None)
            return entry.slot, False
        if entry.weights is None:
            return None, False
        slot = self._free_slot(self.table.bucket_for(entry.weights))
        if slot is None:
            return None, False
        self._slots[slot] = entry  # reserved: neither free nor in the LRU
        entry.slot = slot
        entry.staging = True
        entry.refs += 1
        return slot, True

    def staged(self, entry: SlotItem) -> None:
        """The entry's slot is written."""
        entry.staging = False
        if entry.refs == 0:  # the requests that asked for it ended meanwhile
            self._unpinned(entry)

    def stage_failed(self, entry: SlotItem, error: str) -> None:
        """Writing the entry's slot failed: the slot must not stay reserved."""
        entry.staging = False
        entry.error = error
        self.free(entry)

    def release(self, entry: SlotItem) -> None:
        """One request using the entry ended (each `acquire` that returned a slot)."""
        entry.refs -= 1
        if entry.refs == 0 and entry.slot is not None and not entry.staging:
            self._unpinned(entry)

    def free(self, entry: SlotItem) -> None:
        """Give the entry's slot back (cleared on the device)."""
        slot = entry.slot
        self._lru.pop(slot, None)
        self._slots[slot] = None
        self.table.clear(slot)
        entry.slot = None
        entry.device_weights = None
        if entry.retired:
            self.on_free_retired(entry)

    # ---- views ----------------------------------------------------------------------
    def holders(self) -> list[Any]:
        """The entries holding a slot, by slot."""
        return [e for e in self._slots if e is not None]

    def occupied(self) -> int:
        return sum(e is not None for e in self._slots)

    def busy(self) -> int:
        return sum(1 for e in self._slots if e is not None and e.refs > 0)

    def eviction_order(self) -> list[int]:
        """The unpinned occupied slots, the next one evicted first."""
        return list(self._lru)

    def table_view(self) -> list[tuple[str, str, int] | None]:
        """Per slot: (adapter_id, version, refs) or None."""
        return [None if e is None else (e.adapter_id, e.version, e.refs) for e in self._slots]

    def pressure(self, entry: SlotItem) -> str:
        """Why the entry waits for a slot, with the numbers (for the deadline error)."""
        try:
            bucket = self.table.bucket_for(entry.weights)
        except AdapterError:
            bucket = None
        pinned = [s for s, e in enumerate(self._slots) if e is not None and e.refs > 0]
        out = (f"{len(pinned)} of {self.table.max_active} device adapters are pinned by "
               "running requests (--max-active-adapters)")
        if bucket is not None:
            out += (f"; {sum(s in bucket for s in pinned)} of {bucket.count} "
                    f"{bucket.name} slots (--lora-slots)")
        return out

    # ---- internals ------------------------------------------------------------------
    def _free_slot(self, bucket) -> int | None:
        """A free slot of the bucket, evicting the least recently used unpinned adapter of
        the bucket when it is full, or of any bucket when the device holds max_active
        adapters; None when that would take a pinned slot."""
        free = next((s for s in bucket.slots if self._slots[s] is None), None)
        if free is None:
            victim = next((s for s in self._lru if s in bucket), None)
            if victim is None:
                return None
            self._evict(victim)
            return victim
        if self.occupied() >= self.table.max_active:
            if not self._lru:
                return None
            self._evict(next(iter(self._lru)))
        return free

    def _evict(self, slot: int) -> None:
        self.free(self._slots[slot])
        self.on_evict()

    def _unpinned(self, entry: SlotItem) -> None:
        """An entry on the device that no request uses: freed if retired, else in the
        LRU of slots that may be evicted."""
        if entry.retired:
            self.free(entry)
        else:
            self._lru[entry.slot] = None
