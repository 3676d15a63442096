"""The host tier's budget: adapter weights in host memory, least recently used first out.

`HostCache` decides, and does nothing else: no threads, no disk, no lock of its own (the
registry calls it under its lock). It keeps the budget in bytes, the host memory other
tiers reserve in it (ONNX sessions, `reserve` / `release`), and the bytes freed since the
heap was last trimmed. The entries themselves stay the registry's: the cache is handed
them at each call and evicts by dropping an entry's `weights`.

An entry is pinned in host memory while it is on the device (`slot` set) or used by a
request (`refs`); `trim` evicts only unpinned ones, least recently used (`last_used`)
first, and never the one just loaded for a request (`keep`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from server.adapters.lora import AdapterError


class HostItem(Protocol):
    """What the cache reads of an entry (server.adapters.registry.AdapterEntry)."""
    weights: Any  # None (not in host memory) or weights with `nbytes`
    slot: int | None
    refs: int
    last_used: float


def release_heap() -> None:
    """Hand freed adapter memory back to the OS (glibc keeps it otherwise), so that
    replacing and unloading adapters does not grow the resident size."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


class HostCache:
    def __init__(self, budget: int, *, on_evict: Callable[[], None] = lambda: None,
                 release_heap: Callable[[], None] = release_heap) -> None:
        """`budget`: bytes of host memory for adapter weights and reservations.
        `on_evict`: called once per entry evicted (the registry's metric).
        `release_heap`: hands freed memory back to the OS (malloc_trim)."""
        self.budget = budget
        self.on_evict = on_evict
        self.release_heap = release_heap
        self._external: dict[str, int] = {}  # host bytes of other tiers (ONNX sessions)
        self._untrimmed = 0  # host bytes evicted since the last heap trim

    @staticmethod
    def pinned(item: HostItem) -> bool:
        """On the device or used by a request: its weights stay in host memory."""
        return item.slot is not None or item.refs > 0

    @staticmethod
    def weights_bytes(items: Iterable[HostItem]) -> int:
        return sum(e.weights.nbytes for e in items if e.weights is not None)

    def total(self, items: Iterable[HostItem]) -> int:
        """Host bytes counted in the budget: the entries' weights and the reservations."""
        return sum(self._external.values()) + self.weights_bytes(items)

    def reserved(self) -> dict[str, int]:
        return dict(self._external)

    def check_fits(self, adapter_id: str, nbytes: int) -> None:
        if nbytes > self.budget:
            raise AdapterError(f"adapter {adapter_id!r} needs {nbytes} bytes, more "
                               f"than the host adapter memory {self.budget}")

    def trim(self, live: Iterable[HostItem], every: Sequence[HostItem],
             keep: HostItem | None = None) -> list[HostItem]:
        """Evict host weights of the `live` entries (the ones an id names), least recently
        used first, until `every` entry's weights (live, and those retired but still on
        the device) and the reservations fit the budget. Pinned entries keep theirs, and
        so does `keep` (just loaded for a request: evicting it would only make the
        request load it again). Returns the entries evicted, in order."""
        candidates = sorted((e for e in live if e.weights is not None
                             and not self.pinned(e) and e is not keep),
                            key=lambda e: e.last_used)
        usage = self.total(every)
        evicted = []
        for entry in candidates:
            if usage <= self.budget:
                break
            usage -= entry.weights.nbytes
            self._untrimmed += entry.weights.nbytes
            entry.weights = None
            evicted.append(entry)
            self.on_evict()
        # The loads that cause evictions mostly reuse the freed memory; a heap walk per
        # 256 MiB (or eighth of the budget) freed keeps the resident size bounded at a
        # fraction of the cost of one per eviction (7 ms of a 20 ms page-cached load).
        if self._untrimmed >= min(self.budget // 8, 256 << 20):
            self.release_heap()
            self._untrimmed = 0
        return evicted

    def reserve(self, key: str, nbytes: int, live: Sequence[HostItem],
                every: Sequence[HostItem]) -> bool:
        """Count another tier's host memory (`key`) in the budget, evicting unpinned
        weights (LRU) to make room. False, and nothing reserved, when it cannot fit."""
        self._external[key] = nbytes
        self.trim(live, every)
        if self.total(every) <= self.budget:
            return True
        del self._external[key]
        return False

    def release(self, key: str) -> None:
        self._external.pop(key, None)

    def drop(self, item: HostItem) -> None:
        """An entry that is gone for good (replaced or unloaded) gives its weights back,
        and the heap is trimmed at once."""
        item.weights = None
        self.release_heap()
