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
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_format.manifest import MANIFEST_NAME, ArtifactError, read_manifest
from server.adapters.buffers import HostBuffers
from server.adapters.formats import AdapterWeights
from server.adapters.kinds import ADAPTER_TYPES, CONFIG_FILES, AdapterKind, method_of, read_adapter
from server.adapters.lora import AdapterError
from server.adapters.slot_buckets import Bucket, SlotBuckets
from server.engine.model import ModelSpec
from server.metrics import ServerMetrics
from textguard import Policy, PolicyError
from textguard.policy import load_adapter_policy

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
        self.root = root.resolve()
        self.spec = spec
        self.table = table
        self.base_fingerprint = base_fingerprint
        self.allow_pickle = allow_pickle
        self.host_bytes = host_bytes
        self._external: dict[str, int] = {}  # host bytes of other tiers (ONNX sessions)
        self._untrimmed = 0  # host bytes evicted since the last heap trim
        self.dtype = dtype
        self.device = device
        self._entries: dict[str, AdapterEntry] = {}
        self._versions: dict[str, int] = {}
        self._slots: list[AdapterEntry | None] = [None] * table.num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned occupied slots
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self.buffers = HostBuffers()  # files are read into buffers faulted in advance
        # Slot writes have their own thread: they never queue behind reads from disk.
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-stage",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self.on_ready: Callable[[], None] = on_ready or (lambda: None)
        self.metrics = metrics if metrics is not None else ServerMetrics(process_metrics=False)

    # ---- admin side -------------------------------------------------------------
    def scan(self, preload: tuple[str, ...] = ()) -> list[str]:
        """Register every adapter directory under the root (disk tier) and load the
        `preload` ids into host memory. Returns the ids that could not be registered."""
        failed = []
        for sub in self._adapter_dirs():
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

    def _adapter_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        # Hidden folders are skipped: the trainer builds artifacts in ".name.tmp-*" first.
        return [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(
            ".") and any((p / name).is_file() for name in CONFIG_FILES)]

    def resolve_path(self, path: str) -> Path:
        """A path inside the adapter root (relative or absolute), symlinks resolved."""
        if not path:
            raise AdapterError("path is empty")
        candidate = Path(path)
        full = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if full != self.root and self.root not in full.parents:
            raise AdapterError(f"path {path!r} resolves outside the adapter root {self.root}")
        if not full.is_dir():
            raise AdapterError(f"path {path!r} is not a directory under {self.root}")
        return full

    def register(self, adapter_id: str, path: str = "") -> AdapterEntry:
        """Know an adapter on disk without reading its weights (new version if it exists)."""
        _check_id(adapter_id)
        full = self.resolve_path(path or adapter_id)
        method = method_of(full)
        self._check_manifest(full, adapter_id)
        policy = _read_policy(full, adapter_id)
        rank, targets = _config_summary(full, ADAPTER_TYPES[method])
        entry = self._new_entry(adapter_id, full, method, rank, targets)
        entry.policy = policy
        with self._lock:
            self._install(entry)
            self._report()
        return entry

    def load(self, adapter_id: str, path: str = "") -> tuple[AdapterEntry, bool]:
        """Read an adapter into host memory now; an existing id gets a new version."""
        _check_id(adapter_id)
        t0 = time.perf_counter()
        full = self.resolve_path(path or adapter_id)
        method = method_of(full)
        self._check_manifest(full, adapter_id)
        policy = _read_policy(full, adapter_id)  # a malformed one keeps the old version
        method, weights = read_adapter(full, self.spec, allow_pickle=self.allow_pickle,
                                       alloc=self.buffers.take)
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
            return [None if e is None else (e.adapter_id, e.version, e.refs) for e in self._slots]

    def host_usage(self) -> int:
        """Adapter weights in host memory (the budget also counts `reserve_host`)."""
        with self._lock:
            return self._weights_bytes()

    def reserve_host(self, key: str, nbytes: int) -> bool:
        """Count another tier's host memory (an ONNX session) in the host budget, evicting
        unused adapter weights (LRU) to make room. False, and nothing reserved, when it
        cannot fit."""
        with self._lock:
            self._external[key] = nbytes
            self._trim_host()
            if self._host_total() <= self.host_bytes:
                return True
            del self._external[key]
            return False

    def release_host(self, key: str) -> None:
        with self._lock:
            self._external.pop(key, None)

    def _weights_bytes(self) -> int:
        return sum(e.weights.nbytes for e in self._all_entries() if e.weights is not None)

    def _host_total(self) -> int:
        return sum(self._external.values()) + self._weights_bytes()

    def sync_with_disk(self) -> dict[str, list[str]]:
        """Pick up adapters added to, changed in or removed from the root (--watch)."""
        seen = {p.name: p for p in self._adapter_dirs()}
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        with self._lock:
            current = dict(self._entries)
        for name, path in seen.items():
            entry = current.get(name)
            if entry is not None and entry.path != path.resolve():
                continue  # registered from elsewhere under the root by LoadAdapter
            if entry is not None and entry.signature == _signature(path):
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
                self._loader.submit(self._load_in_background, entry)
            return False

    def _load_in_background(self, entry: AdapterEntry) -> None:
        t0 = time.perf_counter()
        try:
            method, weights = read_adapter(entry.path, self.spec,
                                           allow_pickle=self.allow_pickle,
                                           alloc=self.buffers.take)
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
            if entry.slot is not None:
                entry.refs += 1
                self._lru.pop(entry.slot, None)
                return entry.slot
            if entry.weights is None:
                return None
            slot = self._free_slot(self.table.bucket_for(entry.weights))
            if slot is None:
                return None
            self._slots[slot] = entry  # reserved: neither free nor in the LRU
            entry.slot = slot
            entry.staging = True
            entry.refs += 1
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
                entry.staging = False
                entry.error = f"writing its device slot failed: {type(e).__name__}: {e}"
                self._free(entry)
            self.on_ready()
            return
        with self._lock:
            entry.staging = False
            if entry.refs == 0:  # the requests that asked for it ended meanwhile
                self._unpinned(entry)
            self._report("device", time.perf_counter() - t0)
        self.on_ready()

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs == 0 and entry.slot is not None and not entry.staging:
                self._unpinned(entry)

    def busy_slots(self) -> int:
        with self._lock:
            return sum(1 for e in self._slots if e is not None and e.refs > 0)

    def slot_pressure(self, entry: AdapterEntry) -> str:
        """Why the entry waits for a slot, with the numbers (for the deadline error)."""
        with self._lock:
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

    # ---- internals (lock held) --------------------------------------------------
    def _new_entry(self, adapter_id, path, method, rank, targets) -> AdapterEntry:
        with self._lock:
            n = self._versions.get(adapter_id, 0) + 1
            self._versions[adapter_id] = n
        sig = _signature(path)
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
        return live + [e for e in self._slots if e is not None and e not in live]

    def _trim_host(self, keep: AdapterEntry | None = None) -> None:
        """Evict host weights, least recently used first, until within the budget.
        Entries on the device or being used keep theirs, and so does `keep` (just loaded
        for a request: evicting it would only make the request load it again)."""
        candidates = sorted((e for e in self._entries.values() if e.weights is not None
                             and e.slot is None and e.refs == 0 and e is not keep),
                            key=lambda e: e.last_used)
        usage = self._host_total()
        for entry in candidates:
            if usage <= self.host_bytes:
                break
            usage -= entry.weights.nbytes
            self._untrimmed += entry.weights.nbytes
            entry.weights = None
            self.metrics.adapter_evicted("host")
        # The loads that cause evictions mostly reuse the freed memory; a heap walk per
        # 256 MiB (or eighth of the budget) freed keeps the resident size bounded at a
        # fraction of the cost of one per eviction (7 ms of a 20 ms page-cached load).
        if self._untrimmed >= min(self.host_bytes // 8, 256 << 20):
            _release_heap()
            self._untrimmed = 0

    def _check_fits(self, adapter_id: str, kind: type[AdapterKind],
                    weights: AdapterWeights) -> None:
        if kind.uses_lora_slot:
            self.table.check_fits(weights, adapter_id)
        if weights.nbytes > self.host_bytes:
            raise AdapterError(f"adapter {adapter_id!r} needs {weights.nbytes} bytes, more "
                               f"than the host adapter memory {self.host_bytes}")

    def _free_slot(self, bucket: Bucket) -> int | None:
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
        if sum(e is not None for e in self._slots) >= self.table.max_active:
            if not self._lru:
                return None
            self._evict(next(iter(self._lru)))
        return free

    def _evict(self, slot: int) -> None:
        self._free(self._slots[slot])
        self.metrics.adapter_evicted("device")

    def _unpinned(self, entry: AdapterEntry) -> None:
        """An entry on the device that no request uses: freed if retired, else in the
        LRU of slots that may be evicted."""
        if entry.retired:
            self._free(entry)
        else:
            self._lru[entry.slot] = None

    def _free(self, entry: AdapterEntry) -> None:
        slot = entry.slot
        self._lru.pop(slot, None)
        self._slots[slot] = None
        self.table.clear(slot)
        entry.slot = None
        entry.device_weights = None
        if entry.retired:
            entry.weights = None
            _release_heap()

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.refs or entry.staging:
            return  # freed when its last request ends, or when its slot write completes
        if entry.slot is not None:
            self._free(entry)
        elif entry.weights is not None:  # (a disk-tier entry has nothing to give back)
            entry.weights = None
            _release_heap()

    def _report(self, loaded_tier: str | None = None, seconds: float = 0.0) -> None:
        if loaded_tier is not None:
            self.metrics.adapter_loaded(loaded_tier, seconds)
        tiers = [e.tier for e in self._entries.values()]
        for tier in ("disk", "host"):
            self.metrics.set_resident_adapters(tier, tiers.count(tier))
        self.metrics.set_resident_adapters("device", sum(e is not None for e in self._slots))

    def _check_manifest(self, path: Path, adapter_id: str) -> None:
        try:
            data = read_manifest(path, missing_ok=True)
        except ArtifactError as e:
            raise AdapterError(f"adapter {adapter_id!r}: {e}") from e
        base = data.get("base_model") or {}
        theirs = base.get("fingerprint") if isinstance(base, dict) else None
        if theirs and theirs != self.base_fingerprint:
            raise AdapterError(
                f"adapter {adapter_id!r} was trained for base fingerprint {theirs}, "
                f"this server runs {self.base_fingerprint}"
            )


def _read_policy(path: Path, adapter_id: str) -> Policy | None:
    """The adapter's own output policy; AdapterError naming file, line and reason."""
    try:
        return load_adapter_policy(path, MANIFEST_NAME)
    except PolicyError as e:
        raise AdapterError(f"adapter {adapter_id!r}: output policy refused: {e}") from e


def _release_heap() -> None:
    """Hand freed adapter memory back to the OS (glibc keeps it otherwise), so that
    replacing and unloading adapters does not grow the resident size."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def _config_summary(path: Path, kind: type[AdapterKind]) -> tuple[int, list[str]]:
    """Rank and target modules from the config file alone (cheap, for the disk tier)."""
    name = kind.config_file
    try:
        cfg = json.loads((path / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path / name}: unreadable ({e})") from e
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return kind.config_rank(cfg), sorted(targets)


def _signature(path: Path) -> tuple:
    out = []
    for name in sorted(os.listdir(path)):
        f = path / name
        if f.is_file():
            st = f.stat()
            out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _check_id(adapter_id: str) -> None:
    if not adapter_id or len(adapter_id) > 128 or "/" in adapter_id or adapter_id.startswith("."):
        raise AdapterError(
            f"adapter_id {adapter_id!r} is invalid (1-128 characters, no '/', not starting "
            "with '.')"
        )
