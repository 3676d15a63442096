"""Checkpoints for resuming: trainable weights, optimizer, RNG and loop state.

Layout under `<run_dir>/checkpoints/step-<N>/`: `trainable.safetensors`, `optimizer.pt`
(loaded with `weights_only=True`), `rng.pt`, `state.json` (written last). Each checkpoint
is built in a hidden temp dir and renamed, so a listed checkpoint is always complete.
The best weights so far live in `<run_dir>/best/trainable.safetensors`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _save_dir_atomic(target: Path, fill) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    keep: int) -> Path:
    """`optimizer` None (FSDP, whose optimizer state is sharded): weights and state only."""
    target = run_dir / "checkpoints" / f"step-{step:08d}"

    def fill(d: Path) -> None:
        save_file({k: v.cpu() for k, v in weights.items()}, str(d / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), d / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
        torch.save(rng, d / "rng.pt")
        (d / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))

    _save_dir_atomic(target, fill)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_file(str(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    st = json.loads(rng["python"])
    random.setstate((st[0], tuple(st[1]), st[2]))
    state = json.loads((path / "state.json").read_text())
    return weights, state


def save_best(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    _save_dir_atomic(run_dir / "best", lambda d: save_file(
        {k: v.cpu() for k, v in weights.items()}, str(d / "trainable.safetensors")))


def load_best(run_dir: Path) -> dict[str, torch.Tensor] | None:
    p = run_dir / "best" / "trainable.safetensors"
    return load_file(str(p)) if p.is_file() else None


def clear(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "best", ignore_errors=True)
