"""Adapters on disk: the root's scan, path, id and manifest checks, and reading weights.

`AdapterLoader` is the registry's only reader of the adapter root. `check` runs what
both registering and loading check before any weights are read (the id, the path inside
the root, the adapter's type, its manifest's base fingerprint, its output policy), in
that order and with the registry's error messages; `read` reads the weights (into the
registry's host buffers), on the caller's thread or, through `submit`, on one of the
two "adapter-load" threads, never on the engine's step loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from adapter_format.manifest import MANIFEST_NAME, ArtifactError, read_manifest
from server.adapters.buffers import Alloc, fresh
from server.adapters.formats import AdapterWeights
from server.adapters.kinds import ADAPTER_TYPES, CONFIG_FILES, AdapterKind, method_of, read_adapter
from server.adapters.lora import AdapterError
from server.engine.model import ModelSpec
from textguard import Policy, PolicyError
from textguard.policy import load_adapter_policy


@dataclass(frozen=True)
class Checked:
    """An adapter directory that passed `AdapterLoader.check`."""
    path: Path  # resolved, inside the root
    method: str  # its type, from its config file
    policy: Policy | None  # its own output policy


class AdapterLoader:
    def __init__(self, root: Path, spec: ModelSpec, base_fingerprint: str, *,
                 allow_pickle: bool = False, alloc: Alloc = fresh) -> None:
        """`alloc`: the buffers read files go into (the registry's HostBuffers.take)."""
        self.root = root.resolve()
        self.spec = spec
        self.base_fingerprint = base_fingerprint
        self.allow_pickle = allow_pickle
        self.alloc = alloc
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def adapter_dirs(self) -> list[Path]:
        """The adapter directories directly under the root, sorted by name."""
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

    def check(self, adapter_id: str, path: str = "") -> Checked:
        """Id, path, type, manifest and output policy; AdapterError naming what failed."""
        check_id(adapter_id)
        full = self.resolve_path(path or adapter_id)
        method = method_of(full)
        self.check_manifest(full, adapter_id)
        policy = read_policy(full, adapter_id)
        return Checked(full, method, policy)

    def check_manifest(self, path: Path, adapter_id: str) -> None:
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

    def read(self, path: Path) -> tuple[str, AdapterWeights]:
        """(method, weights) as read from the directory now."""
        return read_adapter(path, self.spec, allow_pickle=self.allow_pickle, alloc=self.alloc)

    def submit(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on a loader thread."""
        return self._pool.submit(fn, *args)


def check_id(adapter_id: str) -> None:
    if not adapter_id or len(adapter_id) > 128 or "/" in adapter_id or adapter_id.startswith("."):
        raise AdapterError(
            f"adapter_id {adapter_id!r} is invalid (1-128 characters, no '/', not starting "
            "with '.')"
        )


def read_policy(path: Path, adapter_id: str) -> Policy | None:
    """The adapter's own output policy; AdapterError naming file, line and reason."""
    try:
        return load_adapter_policy(path, MANIFEST_NAME)
    except PolicyError as e:
        raise AdapterError(f"adapter {adapter_id!r}: output policy refused: {e}") from e


def config_summary(path: Path, kind: type[AdapterKind]) -> tuple[int, list[str]]:
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


def summary(checked: Checked) -> tuple[int, list[str]]:
    """Rank and target modules of a checked directory, from its config file."""
    return config_summary(checked.path, ADAPTER_TYPES[checked.method])


def signature(path: Path) -> tuple:
    """Names, sizes and mtimes of the directory's files (a change means a new version)."""
    out = []
    for name in sorted(os.listdir(path)):
        f = path / name
        if f.is_file():
            st = f.stat()
            out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)
