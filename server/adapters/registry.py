"""The adapter registry: ids, versions and tiers on one side, device slots on the other.

Tiers: every adapter under the root is known on disk; a loaded adapter is in host memory
(an LRU bounded in bytes); an adapter used by a running request holds a device slot,
pinned while any request uses it and otherwise evicted least recently used. Slots come in
buckets (`SlotBuckets`): a LoRA adapter takes one of the bucket for its rank, whose
table holds its weights; other types take one of their own range and keep small device
tensors of their own. A full bucket evicts its least recently used unpinned adapter; at
`--max-active-adapters` adapters on the device, the least recently used unpinned one of
any bucket makes room. A pinned slot is never taken: a request waits instead.

A request for an adapter that is only on disk loads it just in time on a loader thread,
never on the engine's step loop. Replacing an adapter (LoadAdapter on an existing id, or
a change seen by the watcher) creates a new entry: requests that started on the old
entry keep it, and its slot, until they finish.

This class is the facade: it holds the entries, the lock and the stager thread, and
hands each decision to a piece that does one thing:

  * `loader.AdapterLoader`: the root's scan, id, path, manifest and policy checks, and
    reading weights from disk (on its "adapter-load" threads for just-in-time loads);
  * `host_cache.HostCache`: the host tier's byte budget (shared with ONNX sessions
    through `reserve_host`), LRU eviction of unpinned weights, heap trimming;
  * `slot_manager.SlotManager`: which entry holds which device slot, pins, the LRU of
    unpinned slots and eviction when a bucket or the device is full.

HostCache and SlotManager have no threads, no I/O and no lock: the registry calls them
under its lock, and they are tested step by step on their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.adapters.buffers import HostBuffers
from server.adapters.formats import AdapterWeights
from server.adapters.host_cache import HostCache
from server.adapters.kinds import ADAPTER_TYPES, AdapterKind
from server.adapters.loader import (
    AdapterLoader,
    signature,
    summary,
)
from server.adapters.lora import AdapterError
from server.adapters.slot_buckets import SlotBuckets
from server.adapters.slot_manager import SlotManager
from server.engine.model import ModelSpec
from server.metrics import ServerMetrics
from textguard import Policy

log = logging.getLogger(__name__)


class AdapterNotFoundError(Exception):
    pass


@dataclass(eq=False)
class AdapterEntry:
    adapter_id: str
    version: str
    path: Path
    method: str
    base_fingerprint: str
    signature: tuple  # names, sizes and mtimes of the adapter's files
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    disk_bytes: int = 0
    weights: AdapterWeights | None = None  # host tier when set
    device_weights: AdapterWeights | None = None  # non-LoRA weights on the device
    slot: int | None = None
    refs: int = 0
    retired: bool = False  # replaced or unloaded: freed when its last request ends
    loading: bool = False
    staging: bool = False  # its slot is being written on a loader thread
    error: str | None = None  # why the last load failed
    policy: Policy | None = None  # its output policy (output_policy.yaml or the manifest)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> type[AdapterKind]:
        return ADAPTER_TYPES[self.method]

    @property
    def tier(self) -> str:
        if self.slot is not None and not self.staging:
            return "device"
        return "host" if self.weights else "disk"

    @property
    def size_bytes(self) -> int:
        return self.weights.nbytes if self.weights is not None else self.disk_bytes


class AdapterRegistry:
    def __init__(self, root: Path, spec: ModelSpec, table: SlotBuckets,
                 base_fingerprint: str, *, allow_pickle: bool = False,
                 host_bytes: int = 4 << 30, dtype=torch.float32, device="cpu",
                 on_ready: Callable[[], None] | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        """`on_ready`: called (on a loader or stager thread) when a background host load
        or slot write ends, failed or not: the engine's wake-up. `metrics`: the server's
        (server/app.py hands them in); by default a private, unserved set, so tests and
        benchmarks that build a registry alone need none."""
        self.spec = spec
        self.table = table
        self.base_fingerprint = base_fingerprint
        self.allow_pickle = allow_pickle
        self.dtype = dtype
        self.device = device
        self._entries: dict[str, AdapterEntry] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.RLock()
        self.buffers = HostBuffers()  # files are read into buffers faulted in advance
        self._disk = AdapterLoader(root, spec, base_fingerprint, allow_pickle=allow_pickle,
                                   alloc=self.buffers.take)
        self.root = self._disk.root
        self._host = HostCache(host_bytes,
                               on_evict=lambda: self.metrics.adapter_evicted("host"))
        self._device = SlotManager(table,
                                   on_evict=lambda: self.metrics.adapter_evicted("device"),
                                   on_free_retired=self._host.drop)
        # Slot writes have their own thread: they never queue behind reads from disk.
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-stage",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self.on_ready: Callable[[], None] = on_ready or (lambda: None)
        self.metrics = metrics if metrics is not None else ServerMetrics(process_metrics=False)

    @property
    def host_bytes(self) -> int:
        """The host memory budget for adapter weights and `reserve_host`."""
        return self._host.budget

    @host_bytes.setter
    def host_bytes(self, nbytes: int) -> None:
        self._host.budget = nbytes

    # ---- admin side -------------------------------------------------------------
    def scan(self, preload: tuple[str, ...] = ()) -> list[str]:
        """Register every adapter directory under the root (disk tier) and load the
        `preload` ids into host memory. Returns the ids that could not be registered."""
        failed = []
        for sub in self._disk.adapter_dirs():
            try:
                self.register(sub.name, sub.name)
            except AdapterError as e:
                log.error("adapter %s not registered: %s", sub.name, e)
                failed.append(sub.name)
        for adapter_id in preload:
            try:
                self.load(adapter_id, adapter_id)
            except AdapterError as e:
                log.error("adapter %s not preloaded: %s", adapter_id, e)
                failed.append(adapter_id)
        return failed

    def resolve_path(self, path: str) -> Path:
        """A path inside the adapter root (relative or absolute), symlinks resolved."""
        return self._disk.resolve_path(path)

    def register(self, adapter_id: str, path: str = "") -> AdapterEntry:
        """Know an adapter on disk without reading its weights (new version if it exists)."""
        checked = self._disk.check(adapter_id, path)
        rank, targets = summary(checked)
        entry = self._new_entry(adapter_id, checked.path, checked.method, rank, targets)
        entry.policy = checked.policy
        with self._lock:
            self._install(entry)
            self._report()
        return entry

    def load(self, adapter_id: str, path: str = "") -> tuple[AdapterEntry, bool]:
        """Read an adapter into host memory now; an existing id gets a new version."""
        t0 = time.perf_counter()
        checked = self._disk.check(adapter_id, path)  # a bad policy keeps the old version
        full, policy = checked.path, checked.policy
        method, weights = self._disk.read(full)
        self._check_fits(adapter_id, ADAPTER_TYPES[method], weights)
        entry = self._new_entry(adapter_id, full, method, weights.rank, weights.target_modules)
        entry.weights = weights
        entry.policy = policy
        with self._lock:
            replaced = self._install(entry)
            self._trim_host(keep=entry)
            self._report("host", time.perf_counter() - t0)
        self.buffers.refill()  # after the evictions, which give buffers back
        log.info("adapter %s version %s (%s) loaded from %s%s", adapter_id, entry.version,
                 method, full, f"; output policy: {', '.join(policy.names)}" if policy else "")
        return entry, replaced

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            self._retire(entry)
            self._report()
        self.metrics.forget_adapter(adapter_id)

    def get(self, adapter_id: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(adapter_id)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
        return entry

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.adapter_id)

    def slot_table(self) -> list[tuple[str, str, int] | None]:
        """Per slot: (adapter_id, version, refs) or None. For tests and introspection."""
        with self._lock:
            return self._device.table_view()

    def host_usage(self) -> int:
        """Adapter weights in host memory (the budget also counts `reserve_host`)."""
        with self._lock:
            return self._host.weights_bytes(self._all_entries())

    def reserve_host(self, key: str, nbytes: int) -> bool:
        """Count another tier's host memory (an ONNX session) in the host budget, evicting
        unused adapter weights (LRU) to make room. False, and nothing reserved, when it
        cannot fit."""
        with self._lock:
            return self._host.reserve(key, nbytes, list(self._entries.values()),
                                      self._all_entries())

    def release_host(self, key: str) -> None:
        with self._lock:
            self._host.release(key)

    def sync_with_disk(self) -> dict[str, list[str]]:
        """Pick up adapters added to, changed in or removed from the root (--watch)."""
        seen = {p.name: p for p in self._disk.adapter_dirs()}
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        with self._lock:
            current = dict(self._entries)
        for name, path in seen.items():
            entry = current.get(name)
            if entry is not None and entry.path != path.resolve():
                continue  # registered from elsewhere under the root by LoadAdapter
            if entry is not None and entry.signature == signature(path):
                continue
            try:
                if entry is None:
                    self.register(name, name)
                else:  # changed: load it now so that the new version is checked first
                    self.load(name, name)
                changes["changed" if entry else "added"].append(name)
            except AdapterError as e:
                log.error("adapter %s: change not picked up: %s", name, e)
        for name, entry in current.items():
            if name not in seen and not entry.path.exists():
                self.unload(name)
                changes["removed"].append(name)
        return changes

    # ---- engine side ------------------------------------------------------------
    def ensure_host(self, entry: AdapterEntry) -> bool:
        """True when the entry's weights are in host memory; otherwise starts loading it
        on a loader thread (the engine is woken through `on_ready`) and returns False."""
        with self._lock:
            entry.last_used = time.monotonic()
            if entry.weights is not None:
                return True
            if not entry.loading and entry.error is None:
                entry.loading = True
                self._disk.submit(self._load_in_background, entry)
            return False

    def _load_in_background(self, entry: AdapterEntry) -> None:
        t0 = time.perf_counter()
        try:
            method, weights = self._disk.read(entry.path)
            self._check_fits(entry.adapter_id, ADAPTER_TYPES[method], weights)
        except Exception as e:  # a bad file fails this adapter's requests, nothing else
            log.error("adapter %s failed to load: %s", entry.adapter_id, e)
            with self._lock:
                entry.error = str(e)
                entry.loading = False
        else:
            with self._lock:
                entry.weights = weights
                entry.method = method  # as read (the files may have changed since register)
                entry.loading = False
                self._trim_host(keep=entry)
                self._report("host", time.perf_counter() - t0)
        self.on_ready()
        self.buffers.refill()

    def acquire(self, entry: AdapterEntry) -> int | None:
        """Pin the slot holding the entry, or a free (or evicted) one reserved for it, and
        return it; None, and nothing pinned, while every slot is pinned. A newly reserved
        slot is written on the stager thread, off the step loop: the entry is `staging`
        until then (the registry wakes the engine). Each slot returned is released once.
        The pin taken while staging keeps the slot for the request that asked: no other
        waiting request can evict it between the write and the request's start."""
        with self._lock:
            entry.last_used = time.monotonic()
            slot, new = self._device.acquire(entry)
        if new:
            self._stager.submit(self._stage, entry, slot)
        return slot

    def _stage(self, entry: AdapterEntry, slot: int) -> None:
        """Write an adapter into its reserved slot. No step reads this slot meanwhile: it
        was free or held an unpinned adapter, and no running row refers to it."""
        t0 = time.perf_counter()
        try:
            if entry.kind.uses_lora_slot:
                self.table.write(slot, entry.weights)
            else:
                entry.device_weights = entry.kind.to_device(entry.weights, self.dtype,
                                                            self.device)
        except Exception as e:  # the slot must not stay reserved: fail this adapter only
            log.exception("adapter %s: writing device slot %d failed", entry.adapter_id, slot)
            with self._lock:
                self._device.stage_failed(
                    entry, f"writing its device slot failed: {type(e).__name__}: {e}")
            self.on_ready()
            return
        with self._lock:
            self._device.staged(entry)
            self._report("device", time.perf_counter() - t0)
        self.on_ready()

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            self._device.release(entry)

    def busy_slots(self) -> int:
        with self._lock:
            return self._device.busy()

    def slot_pressure(self, entry: AdapterEntry) -> str:
        """Why the entry waits for a slot, with the numbers (for the deadline error)."""
        with self._lock:
            return self._device.pressure(entry)

    # ---- internals (lock held) --------------------------------------------------
    def _new_entry(self, adapter_id, path, method, rank, targets) -> AdapterEntry:
        with self._lock:
            n = self._versions.get(adapter_id, 0) + 1
            self._versions[adapter_id] = n
        sig = signature(path)
        return AdapterEntry(adapter_id, str(n), path, method, self.base_fingerprint, sig,
                            rank=rank, target_modules=targets,
                            disk_bytes=sum(size for _, size, _ in sig))

    def _install(self, entry: AdapterEntry) -> bool:
        old = self._entries.get(entry.adapter_id)
        self._entries[entry.adapter_id] = entry
        if old is not None:
            self._retire(old)
        return old is not None

    def _all_entries(self) -> list[AdapterEntry]:
        live = list(self._entries.values())
        return live + [e for e in self._device.holders() if e not in live]

    def _trim_host(self, keep: AdapterEntry | None = None) -> None:
        self._host.trim(list(self._entries.values()), self._all_entries(), keep=keep)

    def _check_fits(self, adapter_id: str, kind: type[AdapterKind],
                    weights: AdapterWeights) -> None:
        if kind.uses_lora_slot:
            self.table.check_fits(weights, adapter_id)
        self._host.check_fits(adapter_id, weights.nbytes)

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.refs or entry.staging:
            return  # freed when its last request ends, or when its slot write completes
        if entry.slot is not None:
            self._device.free(entry)
        elif entry.weights is not None:  # (a disk-tier entry has nothing to give back)
            self._host.drop(entry)

    def _report(self, loaded_tier: str | None = None, seconds: float = 0.0) -> None:
        if loaded_tier is not None:
            self.metrics.adapter_loaded(loaded_tier, seconds)
        tiers = [e.tier for e in self._entries.values()]
        for tier in ("disk", "host"):
            self.metrics.set_resident_adapters(tier, tiers.count(tier))
        self.metrics.set_resident_adapters("device", self._device.occupied())
