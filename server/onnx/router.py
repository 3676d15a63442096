"""The routing engine: one `Engine` (server.engine.protocol) over the PyTorch engine and
per-adapter ONNX Runtime engines.

A request for an adapter whose directory holds an ONNX export (recorded in its
`switchboard.json` by `trainer export-onnx`) goes to that export's `OnnxEngine` when the
ONNX path is enabled for it; everything else, and any request that insists on PyTorch,
goes to the PyTorch engine. An export is refused (the adapter stays on PyTorch) when its
record names another adapter version (content hash) or another base model.

Sessions load on one loader thread, never on a request thread and never under the
router's lock: at start for every adapter allowed on the path (start waits for them),
later on the first request for an adapter (or a new version of one). That request waits
for its session (up to its deadline) and is then served by it, as are the requests that
arrive meanwhile for the same adapter; requests for other adapters are not held up.

ONNX sessions are host memory: each counts its model files against `memory_bytes`;
loading one past the budget evicts the least recently used idle session first, and when
none can go the adapter is served by PyTorch until one can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from adapter_format.manifest import ArtifactError, adapter_content_hash, read_manifest
from server.adapters.registry import AdapterNotFoundError
from server.config import OnnxConfig
from server.engine.engine import helper_thread_init
from server.engine.protocol import EngineHealth, EngineInfo, Route, check_engine_path
from server.engine.types import ONNX, PYTORCH, EngineError, GenerationRequest, RequestHandle
from server.onnx.engine import OnnxEngine, OnnxEngineConfig
from server.resources import usable_cpus

if TYPE_CHECKING:
    from server.engine.engine import Engine as PyTorchEngine

log = logging.getLogger(__name__)

VARIANT_PREFERENCE = ("int8", "fp32", "int4")  # `auto`: the first one exported
NO_EXPORT = "no ONNX export"


class _Loaded(NamedTuple):
    entry: Any  # server.adapters.registry.AdapterEntry
    engine: OnnxEngine


class _Loading(NamedTuple):
    entry: Any
    future: Future  # -> OnnxEngine, or None when refused


class _Refusal(NamedTuple):
    entry: Any
    manifest: tuple | None  # switchboard.json's (size, mtime) when refused
    reason: str
    lasting: bool  # until the entry or its manifest changes; False: tried again next time


def find_export(entry, want: str, fingerprint: str) -> tuple[str, Path] | str:
    """(variant, model path) of the registry entry's usable export (`want`: a variant or
    auto) for the base model `fingerprint`, or why there is none."""
    try:
        data = read_manifest(entry.path, missing_ok=True)
    except ArtifactError as e:
        return f"unreadable manifest ({e})"
    exports = (data.get("exports") or {}).get("onnx") or {}
    if not exports:
        return NO_EXPORT
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
    if theirs != fingerprint:
        return (f"refused: the {variant} export is for base fingerprint {theirs}, this "
                f"server runs {fingerprint}")
    path = Path(entry.path) / record.get("path", "")
    if not path.is_file():
        return f"refused: {path} is missing"
    return variant, path


class EngineRouter:
    """Routes each request to the PyTorch engine or its adapter's ONNX engine."""

    def __init__(self, engine: PyTorchEngine, config: OnnxConfig) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.onnx_config = config
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # LRU order
        self._loading: dict[str, _Loading] = {}
        self._retired: list[OnnxEngine] = []  # older versions draining their requests
        self._drained: list[OnnxEngine] = []  # retired and idle: stopped on the loader
        self._refused: dict[str, _Refusal] = {}
        self._lock = threading.RLock()  # never held while a session loads
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-loader",
                                          initializer=helper_thread_init)
        self._started = False
        self._stopped = False

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        with self._lock:
            self._started = True
            for x in self._loaded.values():  # loaded before start (not started yet)
                x.engine.start()
        if not self.onnx_config.enabled:
            return
        pending = [self._session_for(e) for e in self.engine.registry.entries()
                   if self._allowed(e.adapter_id)]
        for p in pending:
            if isinstance(p, Future):
                p.result()

    def warmup(self) -> None:
        self.engine.warmup()
        with self._lock:
            engines = [x.engine for x in self._loaded.values()]
        for e in engines:
            e.warmup()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            engines = [x.engine for x in self._loaded.values()] + self._retired + self._drained
            self._loaded.clear()
            self._retired.clear()
            self._drained.clear()
        for e in engines:
            e.stop()
        self.engine.stop()

    def info(self) -> EngineInfo:
        return self.engine.info()

    def memory(self) -> dict[str, int]:
        with self._lock:
            onnx = sum(x.engine.nbytes for x in self._loaded.values())
        return {**self.engine.memory(), "onnx_sessions": onnx}

    def health(self) -> EngineHealth:
        health = self.engine.health()
        if not health.ok:
            return health
        with self._lock:
            engines = [(aid, x.engine) for aid, x in self._loaded.items()]
        for aid, e in engines:
            h = e.health()
            if not h.ok:
                return EngineHealth(False, f"adapter {aid}: {h.detail}")
        return health

    # ---- requests -----------------------------------------------------------------
    def submit(self, req: GenerationRequest, engine_path: str = "") -> RequestHandle:
        """engine_path: "" (route), "pytorch" (insist), "onnx" (fail if no ONNX path)."""
        check_engine_path(engine_path)
        if req.adapter_id and engine_path != PYTORCH:
            handle = self._submit_onnx(req, required=engine_path == ONNX)
            if handle is not None:
                return handle
        if engine_path == ONNX:
            if not req.adapter_id:
                raise EngineError("FAILED_PRECONDITION",
                                  "engine_path onnx needs an adapter_id with an ONNX export")
            route = self.route(req.adapter_id)
            raise EngineError("FAILED_PRECONDITION",
                              f"adapter {req.adapter_id!r} has no ONNX path: "
                              f"{route.reason or 'not found'}")
        return self.engine.submit(req)

    def route(self, adapter_id: str) -> Route:
        """Which path serves requests for `adapter_id` (without loading anything)."""
        try:
            entry = self.engine.registry.get(adapter_id)
        except AdapterNotFoundError:
            return Route(PYTORCH)
        with self._lock:
            loaded = self._loaded.get(adapter_id)
            if loaded is not None and loaded.entry is entry:
                return Route(ONNX, loaded.engine.variant)
            refusal = self._refused.get(adapter_id)
            if refusal is not None and refusal.entry is entry:
                return Route(PYTORCH, "", refusal.reason)
            loading = self._loading.get(adapter_id)
            loading = loading is not None and loading.entry is entry
        found = self.find_export(entry)
        if isinstance(found, str):
            return Route(PYTORCH, "", found)
        if not self._allowed(adapter_id):
            return Route(PYTORCH, found[0], "the ONNX path is not enabled for this adapter")
        return Route(ONNX, found[0], "loading" if loading else "not loaded yet")

    def find_export(self, entry) -> tuple[str, Path] | str:
        return find_export(entry, self.onnx_config.variant, self.engine.fingerprint)

    def _submit_onnx(self, req: GenerationRequest, required: bool) -> RequestHandle | None:
        """Submit to the adapter's ONNX engine (waiting while its session loads); None
        when the adapter has no ONNX path (or it is unknown: the PyTorch engine says
        NOT_FOUND)."""
        for _ in range(3):  # again if its engine was evicted between load and submit
            try:
                entry = self.engine.registry.get(req.adapter_id)
            except AdapterNotFoundError:
                return None
            if not (required or self._allowed(entry.adapter_id)):
                return None
            engine = self._session_for(entry)
            if isinstance(engine, Future):
                engine = self._wait(engine, req)
            if engine is None:
                return None
            with self._lock:  # a live engine (not evicted, not stopped) takes it
                if engine in self._retired or any(x.engine is engine
                                                  for x in self._loaded.values()):
                    return engine.submit(req)
        return None

    def _wait(self, future: Future, req: GenerationRequest) -> OnnxEngine | None:
        timeout = None if req.deadline is None else max(0.0, req.deadline - time.monotonic())
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise EngineError("DEADLINE_EXCEEDED", "deadline exceeded while the ONNX session "
                              f"of adapter {req.adapter_id!r} was loading") from None
        except CancelledError:
            raise EngineError("UNAVAILABLE", "the server is stopping") from None

    def _allowed(self, adapter_id: str) -> bool:
        cfg = self.onnx_config
        return cfg.enabled and (not cfg.adapters or adapter_id in cfg.adapters)

    # ---- sessions -----------------------------------------------------------------
    def _session_for(self, entry) -> OnnxEngine | Future | None:
        """The ONNX engine of this registry entry: loaded, loading (a Future), or None
        when its export was refused (until the entry or its manifest changes)."""
        aid = entry.adapter_id
        manifest = _manifest_stat(entry.path)
        with self._lock:
            if self._stopped:
                return None
            self._stop_idle_retired()
            loaded = self._loaded.get(aid)
            if loaded is not None and loaded.entry is entry:
                self._loaded.move_to_end(aid)
                return loaded.engine
            loading = self._loading.get(aid)
            if loading is not None and loading.entry is entry:
                return loading.future
            refusal = self._refused.get(aid)
            if (refusal is not None and refusal.entry is entry and refusal.lasting
                    and refusal.manifest == manifest):
                return None
            future = self._loader.submit(self._load, entry)
            self._loading[aid] = _Loading(entry, future)
            return future

    def _load(self, entry) -> OnnxEngine | None:
        """On the loader thread: find the entry's export, make room, open its session."""
        aid = entry.adapter_id
        try:
            return self._open(entry)
        finally:
            with self._lock:
                loading = self._loading.get(aid)
                if loading is not None and loading.entry is entry:
                    del self._loading[aid]

    def _open(self, entry) -> OnnxEngine | None:
        aid = entry.adapter_id
        registry = self.engine.registry
        with self._lock:
            loaded = self._loaded.get(aid)
            if loaded is not None:  # a new version: the old engine drains, then stops
                del self._loaded[aid]
                self._retired.append(loaded.engine)
                registry.release_host(_host_key(aid))
        manifest = _manifest_stat(entry.path)
        found = self.find_export(entry)
        if isinstance(found, str):
            if found != NO_EXPORT:
                log.warning("adapter %s stays on PyTorch: %s", aid, found)
            self._refuse(entry, manifest, found, lasting=True)
            return None
        variant, path = found
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
        with self._lock:
            room, evicted = self._make_room(aid, size)
        for e in evicted:
            e.stop()
        if not room:
            self._refuse(entry, manifest, (
                f"no host memory for the {variant} export ({size} bytes): --onnx-memory "
                f"is {self.onnx_config.memory_bytes}, --max-host-adapter-memory "
                f"{registry.host_bytes} (shared with adapter weights)"), lasting=False)
            return None
        try:
            engine = self._build(entry, variant, path)  # the session: the slow part
        except BaseException:
            registry.release_host(_host_key(aid))
            raise
        with self._lock:
            if not self._stopped:
                self._loaded[aid] = _Loaded(entry, engine)
                self._refused.pop(aid, None)
                if self._started:
                    engine.start()
                log.info("adapter %s version %s: ONNX %s path from %s (%.1f MB)", aid,
                         entry.version, variant, path, engine.nbytes / 1e6)
                return engine
        registry.release_host(_host_key(aid))  # stopped while it loaded
        return None

    def _refuse(self, entry, manifest, reason: str, lasting: bool) -> None:
        with self._lock:
            self._refused[entry.adapter_id] = _Refusal(entry, manifest, reason, lasting)

    def _build(self, entry, variant: str, path: Path) -> OnnxEngine:
        base = self.engine
        cfg = self.onnx_config
        ecfg = base.config
        return OnnxEngine(
            path, base.tokenizer, base.eos_ids, base.max_seq_len,
            # 0: as many as the PyTorch engine (affinity capped by a cgroup CPU quota,
            # server.resources), not ONNX Runtime's every host core
            OnnxEngineConfig(threads=cfg.threads or usable_cpus(), provider=cfg.provider,
                             max_batch_size=ecfg.max_batch_size,
                             max_tokens_per_step=ecfg.max_tokens_per_step,
                             max_queue=ecfg.max_queue),
            adapter_id=entry.adapter_id, adapter_version=entry.version, variant=variant,
            fingerprint=base.fingerprint, metrics=base.metrics,
            output_policies=base.output_policies,
            adapter_policy=entry.policy)  # this version's rules, like its weights

    def _make_room(self, aid: str, size: int) -> tuple[bool, list[OnnxEngine]]:
        """Room for a session of `size` bytes: within --onnx-memory, and within the
        registry's host budget (shared with adapter weights, which are evicted first).
        Idle sessions are evicted, least recently used first, until both hold; -> (room,
        the evicted engines, for the caller to stop outside the lock)."""
        registry = self.engine.registry
        budget = self.onnx_config.memory_bytes
        used = sum(x.engine.nbytes for x in self._loaded.values())
        victims = [a for a in self._loaded if self._loaded[a].engine.idle()]  # LRU first
        evicted: list[OnnxEngine] = []
        while True:
            if used + size <= budget and registry.reserve_host(_host_key(aid), size):
                return True, evicted
            if not victims:
                return False, evicted
            victim = victims.pop(0)
            loaded = self._loaded.pop(victim)
            evicted.append(loaded.engine)
            registry.release_host(_host_key(victim))
            used -= loaded.engine.nbytes
            log.info("ONNX session of %s evicted (memory budget)", victim)

    def _stop_idle_retired(self) -> None:
        """Older versions that have drained are stopped, on the loader thread."""
        idle = [e for e in self._retired if e.idle()]
        if idle:
            self._retired = [e for e in self._retired if e not in idle]
            self._drained += idle
            self._loader.submit(self._stop_drained)

    def _stop_drained(self) -> None:
        with self._lock:
            engines, self._drained = self._drained, []
        for e in engines:
            e.stop()


def _manifest_stat(path) -> tuple | None:
    try:
        st = (Path(path) / "switchboard.json").stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _host_key(adapter_id: str) -> str:
    return f"onnx:{adapter_id}"
