"""Routing between the PyTorch engine and per-adapter ONNX Runtime engines.

A request for an adapter whose directory holds an ONNX export (recorded in its
`switchboard.json` by `trainer export-onnx`) goes to that export's `OnnxEngine` when the
ONNX path is enabled for it; everything else, and any request that insists on PyTorch,
goes to the PyTorch engine. An export is refused (the adapter stays on PyTorch) when its
record names another adapter version (content hash) or another base model.

ONNX sessions are host memory: each counts its model files against `memory_bytes`;
loading one past the budget evicts the least recently used idle session first, and when
none can go the adapter is served by PyTorch until one can.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

from adapter_format.manifest import ArtifactError, adapter_content_hash, read_manifest
from server.config import OnnxConfig
from server.engine.types import EngineError, GenerationRequest, RequestHandle
from server.onnx.engine import OnnxEngine, OnnxEngineConfig
from server.resources import usable_cpus

log = logging.getLogger(__name__)

PYTORCH, ONNX = "pytorch", "onnx"
VARIANT_PREFERENCE = ("int8", "fp32", "int4")  # `auto`: the first one exported


class Route(NamedTuple):
    path: str  # pytorch or onnx
    variant: str = ""  # fp32, int8, int4 on the ONNX path
    reason: str = ""  # why an adapter with an export is not on the ONNX path


class _Loaded(NamedTuple):
    entry: Any  # server.adapters.registry.AdapterEntry
    engine: OnnxEngine


class EngineRouter:
    """Stands in for the PyTorch engine: anything not defined here is the PyTorch
    engine's (tokenizer, spec, registry, ...)."""

    def __init__(self, engine, config: OnnxConfig) -> None:
        self.engine = engine
        self.onnx_config = config
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # LRU order
        self._retired: list[OnnxEngine] = []
        self._refused: dict[str, str] = {}  # adapter_id -> reason (for its current entry)
        self._lock = threading.RLock()
        self._started = False

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        self._started = True
        if self.onnx_config.enabled:
            for entry in self.engine.registry.entries():
                self._engine_for(entry)

    def warmup(self) -> None:
        self.engine.warmup()
        with self._lock:
            engines = [x.engine for x in self._loaded.values()]
        for e in engines:
            e.warmup()

    def stop(self) -> None:
        with self._lock:
            engines = [x.engine for x in self._loaded.values()] + self._retired
            self._loaded.clear()
            self._retired.clear()
        for e in engines:
            e.stop()
        self.engine.stop()

    def memory(self) -> dict[str, int]:
        with self._lock:
            onnx = sum(x.engine.nbytes for x in self._loaded.values())
        return {**self.engine.memory(), "onnx_sessions": onnx}

    # ---- requests -----------------------------------------------------------------
    def submit(self, req: GenerationRequest, engine_path: str = "") -> RequestHandle:
        """engine_path: "" (route), "pytorch" (insist), "onnx" (fail if no ONNX path)."""
        if engine_path not in ("", PYTORCH, ONNX):
            raise EngineError("INVALID_ARGUMENT", f"engine_path {engine_path!r} is not one of "
                              "pytorch, onnx")
        onnx = None
        if req.adapter_id and engine_path != PYTORCH:
            try:
                entry = self.engine.registry.get(req.adapter_id)
            except Exception:
                entry = None  # the PyTorch engine reports NOT_FOUND
            if entry is not None:
                onnx = self._engine_for(entry, required=engine_path == ONNX)
        if engine_path == ONNX and onnx is None:
            if not req.adapter_id:
                raise EngineError("FAILED_PRECONDITION",
                                  "engine_path onnx needs an adapter_id with an ONNX export")
            route = self.route(req.adapter_id)
            raise EngineError("FAILED_PRECONDITION",
                              f"adapter {req.adapter_id!r} has no ONNX path: "
                              f"{route.reason or 'not found'}")
        if onnx is not None:
            return onnx.submit(req)
        return self.engine.submit(req)

    def route(self, adapter_id: str) -> Route:
        """Which path serves requests for `adapter_id` (without loading anything)."""
        with self._lock:
            loaded = self._loaded.get(adapter_id)
            if loaded is not None:
                try:
                    current = self.engine.registry.get(adapter_id)
                except Exception:
                    current = None
                if loaded.entry is current:
                    return Route(ONNX, loaded.engine.variant)
            if adapter_id in self._refused:
                return Route(PYTORCH, "", self._refused[adapter_id])
        try:
            entry = self.engine.registry.get(adapter_id)
        except Exception:
            return Route(PYTORCH)
        found = self.find_export(entry)
        if isinstance(found, str):
            return Route(PYTORCH, "", found)
        if not self._allowed(adapter_id):
            return Route(PYTORCH, found[0], "the ONNX path is not enabled for this adapter")
        return Route(ONNX, found[0], "not loaded yet")

    def routes(self) -> dict[str, Route]:
        return {e.adapter_id: self.route(e.adapter_id) for e in self.engine.registry.entries()}

    # ---- exports ------------------------------------------------------------------
    def find_export(self, entry) -> tuple[str, Path] | str:
        """(variant, model path) of the entry's usable export, or why there is none."""
        try:
            data = read_manifest(entry.path, missing_ok=True)
        except ArtifactError as e:
            return f"unreadable manifest ({e})"
        exports = (data.get("exports") or {}).get("onnx") or {}
        if not exports:
            return "no ONNX export"
        want = self.onnx_config.variant
        order = VARIANT_PREFERENCE if want == "auto" else (want,)
        variant = next((v for v in order if v in exports), None)
        if variant is None:
            return f"no {want} ONNX export (has {', '.join(sorted(exports))})"
        record = exports[variant]
        digest = adapter_content_hash(Path(entry.path))
        if record.get("adapter_hash") != digest:
            return (f"refused: the {variant} export was made from adapter content "
                    f"{record.get('adapter_hash')}, version {entry.version} is {digest}; "
                    "export it again")
        theirs = (record.get("base_model") or {}).get("fingerprint")
        if theirs != self.engine.fingerprint:
            return (f"refused: the {variant} export is for base fingerprint {theirs}, this "
                    f"server runs {self.engine.fingerprint}")
        path = Path(entry.path) / record.get("path", "")
        if not path.is_file():
            return f"refused: {path} is missing"
        return variant, path

    def _allowed(self, adapter_id: str) -> bool:
        cfg = self.onnx_config
        return cfg.enabled and (not cfg.adapters or adapter_id in cfg.adapters)

    def _engine_for(self, entry, required: bool = False) -> OnnxEngine | None:
        """The running ONNX engine for this registry entry, loaded on first use."""
        aid = entry.adapter_id
        if not (self._allowed(aid) or required):
            return None
        with self._lock:
            self._stop_idle_retired()
            loaded = self._loaded.get(aid)
            if loaded is not None and loaded.entry is entry:
                self._loaded.move_to_end(aid)
                return loaded.engine
            if loaded is not None:  # a new version: the old engine drains, then stops
                del self._loaded[aid]
                self._retired.append(loaded.engine)
                self.engine.registry.release_host(_host_key(aid))
            found = self.find_export(entry)
            if isinstance(found, str):
                if found != "no ONNX export":
                    log.warning("adapter %s stays on PyTorch: %s", aid, found)
                self._refused[aid] = found
                return None
            variant, path = found
            size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
            if not self._make_room(aid, size):
                self._refused[aid] = (
                    f"no host memory for the {variant} export ({size} bytes): --onnx-memory "
                    f"is {self.onnx_config.memory_bytes}, --max-host-adapter-memory "
                    f"{self.engine.registry.host_bytes} (shared with adapter weights)")
                return None
            engine = self._load(entry, variant, path)
            self._loaded[aid] = _Loaded(entry, engine)
            self._refused.pop(aid, None)
            return engine

    def _load(self, entry, variant: str, path: Path) -> OnnxEngine:
        base = self.engine
        cfg = self.onnx_config
        ecfg = base.config
        engine = OnnxEngine(
            path, base.tokenizer, base.eos_ids, base.max_seq_len,
            # 0: as many as the PyTorch engine (affinity capped by a cgroup CPU quota,
            # server.resources), not ONNX Runtime's every host core
            OnnxEngineConfig(threads=cfg.threads or usable_cpus(), provider=cfg.provider,
                             max_batch_size=ecfg.max_batch_size,
                             max_tokens_per_step=ecfg.max_tokens_per_step,
                             max_queue=ecfg.max_queue),
            adapter_id=entry.adapter_id, adapter_version=entry.version, variant=variant)
        engine.metrics = base.metrics
        engine.output_policies = base.output_policies
        engine.adapter_policy = entry.policy  # this version's rules, like its weights
        if self._started:
            engine.start()
        log.info("adapter %s version %s: ONNX %s path from %s (%.1f MB)", entry.adapter_id,
                 entry.version, variant, path, engine.nbytes / 1e6)
        return engine

    def _make_room(self, aid: str, size: int) -> bool:
        """Room for a session of `size` bytes: within --onnx-memory, and within the
        registry's host budget (shared with adapter weights, which are evicted first).
        Idle sessions are evicted, least recently used first, until both hold."""
        registry = self.engine.registry
        budget = self.onnx_config.memory_bytes
        used = sum(x.engine.nbytes for x in self._loaded.values())
        victims = [a for a in self._loaded if self._loaded[a].engine.idle()]  # LRU first
        while True:
            if used + size <= budget and registry.reserve_host(_host_key(aid), size):
                return True
            if not victims:
                return False
            victim = victims.pop(0)
            loaded = self._loaded.pop(victim)
            loaded.engine.stop()
            registry.release_host(_host_key(victim))
            used -= loaded.engine.nbytes
            log.info("ONNX session of %s evicted (memory budget)", victim)

    def _stop_idle_retired(self) -> None:
        for e in [e for e in self._retired if e.idle()]:
            self._retired.remove(e)
            e.stop()


def _host_key(adapter_id: str) -> str:
    return f"onnx:{adapter_id}"
