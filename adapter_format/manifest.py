"""The manifest (`switchboard.json`) and the atomic writes of an adapter directory.

The trainer writes artifacts with `write_atomic`; the ONNX exporter and `trainer merge`
record what they add with `update_manifest`; the server reads with `read_manifest`.

The directory is assembled in a hidden sibling (`.<name>.tmp-*`, same parent, so the same
file system) and renamed into place only once every file is complete and flushed, so a
crash never leaves a half-written adapter under the real name. Readers (the server's
adapter scan) must skip names that start with a dot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "switchboard.json"
MANIFEST_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact cannot be written, read or verified."""


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_atomic(
    target: str | Path, fill: Callable[[Path], None], manifest: dict[str, Any]
) -> Path:
    """Create `target` with the files written by `fill(tmpdir)` plus the manifest.

    An existing `target` is replaced: it is moved aside first and deleted after the new one
    is in place (two renames; there is no moment without a complete directory on disk
    except between them, and never a partial one under `target`).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        body = {"manifest_version": MANIFEST_VERSION, **manifest,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST_NAME).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(path: str | Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The manifest of the adapter directory `path`; {} when it has none and `missing_ok`.
    Raises ArtifactError naming the file when it is missing (else) or unreadable."""
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        if missing_ok:
            return {}
        raise ArtifactError(f"{str(path)!r} is not a Switchboard artifact (no {MANIFEST_NAME})")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: unreadable {MANIFEST_NAME} ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{p}: {MANIFEST_NAME} is not a JSON object")
    return data


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest of `path` whole (a temp file renamed over it)."""
    p = Path(path) / MANIFEST_NAME
    tmp = p.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, p)


def update_manifest(path: str | Path, **fields: Any) -> None:
    """Rewrite the manifest with `fields` merged in."""
    manifest = read_manifest(path)
    manifest.update(fields)
    write_manifest(path, manifest)


def adapter_content_hash(adapter: Path) -> str:
    """Identity of an adapter's content: its config and weight files (`adapter_*`), not the
    manifest (which the export itself rewrites)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(adapter)):
        f = adapter / name
        if f.is_file() and name.startswith("adapter_"):
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
