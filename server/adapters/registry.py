"""The adapter registry: ids, versions and paths on one side, device slots on the other.

Tiers: every adapter under the root is on disk; a loaded adapter is in host memory (its
weights in the engine's layout); an adapter used by a running request also holds a device
slot, pinned while any request uses it and otherwise evicted least recently used.
Replacing an adapter (LoadAdapter on an existing id) creates a new entry: requests that
started on the old entry keep it (and its slot) until they finish.
Bookkeeping is locked; slot contents are written only from the engine thread (`acquire`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.lora import AdapterError, LoraWeights, read_lora
from server.adapters.slots import LoraSlotTable
from server.engine.model import ModelSpec

log = logging.getLogger(__name__)
MANIFEST = "switchboard.json"


class AdapterNotFoundError(Exception):
    pass


@dataclass(eq=False)
class AdapterEntry:
    adapter_id: str
    version: str
    path: Path
    method: str
    weights: LoraWeights
    content_hash: str
    base_fingerprint: str
    loaded_at: float = field(default_factory=time.time)
    slot: int | None = None
    refs: int = 0
    retired: bool = False  # replaced or unloaded: freed when its last request ends

    @property
    def size_bytes(self) -> int:
        return self.weights.nbytes


class AdapterRegistry:
    def __init__(
        self,
        root: Path,
        spec: ModelSpec,
        table: LoraSlotTable,
        base_fingerprint: str,
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.root = root.resolve()
        self.spec = spec
        self.table = table
        self.base_fingerprint = base_fingerprint
        self.allow_pickle = allow_pickle
        self._entries: dict[str, AdapterEntry] = {}
        self._versions: dict[str, int] = {}
        self._slots: list[AdapterEntry | None] = [None] * table.num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned occupied slots
        self._lock = threading.Lock()
        self.metrics = None  # server.metrics.ServerMetrics, set by the app

    # ---- admin side -------------------------------------------------------------
    def scan(self) -> list[str]:
        """Load every adapter directory under the root; return the ids that failed."""
        failed = []
        if not self.root.is_dir():
            return failed
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and (sub / "adapter_config.json").is_file():
                try:
                    self.load(sub.name, sub.name)
                except AdapterError as e:
                    log.error("adapter %s not loaded: %s", sub.name, e)
                    failed.append(sub.name)
        return failed

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

    def load(self, adapter_id: str, path: str = "") -> tuple[AdapterEntry, bool]:
        """Read an adapter from disk; an existing id gets a new version. -> (entry, replaced)."""
        _check_id(adapter_id)
        t0 = time.perf_counter()
        full = self.resolve_path(path or adapter_id)
        method = _method_of(full)
        if method != "lora":
            raise AdapterError(f"adapter {adapter_id!r}: method {method!r} is not served yet")
        self._check_manifest(full, adapter_id)
        weights = read_lora(full, self.spec, allow_pickle=self.allow_pickle)
        self.table.check_fits(weights, adapter_id)
        digest = _content_hash(full)
        with self._lock:
            n = self._versions.get(adapter_id, 0) + 1
            self._versions[adapter_id] = n
            entry = AdapterEntry(adapter_id, str(n), full, method, weights, digest,
                                 self.base_fingerprint)
            old = self._entries.get(adapter_id)
            self._entries[adapter_id] = entry
            if old is not None:
                self._retire(old)
            self._report("host", time.perf_counter() - t0)
        log.info("adapter %s version %s loaded from %s (rank %d)", adapter_id, entry.version,
                 full, weights.rank)
        return entry, old is not None

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            self._retire(entry)
            self._report()
        if self.metrics is not None:
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

    # ---- engine side ------------------------------------------------------------
    def acquire(self, entry: AdapterEntry) -> int | None:
        """Pin a slot holding the entry, loading it into a free or evicted slot if needed.
        None when every slot is pinned by running requests (the request waits)."""
        with self._lock:
            if entry.slot is not None:
                entry.refs += 1
                self._lru.pop(entry.slot, None)
                return entry.slot
            slot = self._free_slot()
            if slot is None:
                return None
            t0 = time.perf_counter()
            self.table.write(slot, entry.weights)
            self._slots[slot] = entry
            entry.slot = slot
            entry.refs = 1
            self._report("device", time.perf_counter() - t0)
            return slot

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs == 0 and entry.slot is not None:
                if entry.retired:
                    self._free(entry)
                else:
                    self._lru[entry.slot] = None

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._slots):
            if owner is None:
                return slot
        if self._lru:
            slot, _ = self._lru.popitem(last=False)
            self._free(self._slots[slot])
            if self.metrics is not None:
                self.metrics.adapter_evicted("device")
            return slot
        return None

    def _free(self, entry: AdapterEntry) -> None:
        slot = entry.slot
        self._lru.pop(slot, None)
        self._slots[slot] = None
        self.table.clear(slot)
        entry.slot = None

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.refs == 0 and entry.slot is not None:
            self._free(entry)

    def _report(self, loaded_tier: str | None = None, seconds: float = 0.0) -> None:
        """Metrics after a change (the lock is held)."""
        if self.metrics is None:
            return
        if loaded_tier is not None:
            self.metrics.adapter_loaded(loaded_tier, seconds)
        self.metrics.set_resident_adapters("host", len(self._entries))
        self.metrics.set_resident_adapters("device", sum(e is not None for e in self._slots))

    def _check_manifest(self, path: Path, adapter_id: str) -> None:
        manifest = path / MANIFEST
        if not manifest.is_file():
            return
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"adapter {adapter_id!r}: unreadable {MANIFEST} ({e})") from e
        theirs = (data.get("base_model") or {}).get("fingerprint")
        if theirs and theirs != self.base_fingerprint:
            raise AdapterError(
                f"adapter {adapter_id!r} was trained for base fingerprint {theirs}, "
                f"this server runs {self.base_fingerprint}"
            )


def _method_of(path: Path) -> str:
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        raise AdapterError(f"{path}: no adapter_config.json")
    try:
        peft_type = str(json.loads(cfg.read_text()).get("peft_type", "")).lower()
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg}: unreadable adapter config ({e})") from e
    return peft_type or "unknown"


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        f = path / name
        if f.is_file() and name.startswith("adapter_"):
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _check_id(adapter_id: str) -> None:
    if not adapter_id or len(adapter_id) > 128 or "/" in adapter_id or adapter_id.startswith("."):
        raise AdapterError(
            f"adapter_id {adapter_id!r} is invalid (1-128 characters, no '/', not starting "
            "with '.')"
        )
