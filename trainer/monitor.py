"""What the loop watches besides the loss: the size of each update relative to the weights,
and the per-step record (`metrics.jsonl`) that `trainer plot` draws.

Update ratio: for the trainable parameters `w` and one optimizer step `u = w_after -
w_before`, `||u|| / ||w_before||` (Frobenius norms over all tensors of a group together).
Measured overall and per module group (`module_group`) on logging steps only: it needs a
copy of the trainable weights taken before the step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("trainer")

# With Adam each element moves by about the learning rate a step, so the ratio is about
# lr / |weight|: ~1e-2 for LoRA at lr 1e-3 (measured on date_zh: 3.6e-2 at step 5 down to
# 7.5e-4 at step 80 as the learning rate decays; docs/trainer.md), less for full
# fine-tuning at its far lower learning rate. Outside the bounds below for
# `UPDATE_RATIO_PATIENCE` logging steps in a row the loop warns: below, the weights barely
# move (learning rate far too low, gradients vanishing or clipped to nothing); above, each
# step rewrites a tenth of the weights (learning rate far too high).
UPDATE_RATIO_LOW = 1e-6
UPDATE_RATIO_HIGH = 1e-1
UPDATE_RATIO_PATIENCE = 3

GROUPS = ("prompt", "embed", "lm_head", "attn", "mlp", "norm", "other")


def module_group(name: str) -> str:
    """The group a parameter belongs to, from its name: soft prompts (`prompt`), the token
    embeddings (`embed`), the LM head, attention (`attn`; LoRA on q/k/v/o and the bottleneck
    adapter after attention too), `mlp`, the norms, or `other`."""
    n = name.lower()
    if "prompt_encoder" in n or "prompt_embeddings" in n or "prefix_encoder" in n:
        return "prompt"
    if "embed_tokens" in n or "wte" in n:
        return "embed"
    if "lm_head" in n:
        return "lm_head"
    if ".self_attn." in n or ".attn." in n:
        return "attn"
    if ".mlp." in n:
        return "mlp"
    if "norm" in n:
        return "norm"
    return "other"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly FSDP-sharded DTensor) parameter this process holds."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class UpdateRatio:
    """`before()` copies the trainable weights; `after()` returns the update ratios.

    With `sharded=True` (FSDP: each rank holds a slice of every parameter) the squared norms
    are summed over the ranks before the square root."""

    def __init__(self, model: nn.Module, sharded: bool = False) -> None:
        self.model = model
        self.sharded = sharded
        self._before: list[torch.Tensor] | None = None

    @property
    def named(self) -> list[tuple[str, torch.Tensor]]:
        # looked up at each call: references held from before FSDP2's lazy initialisation
        # (its first forward) crashed on to_local() for method full
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def before(self) -> None:
        named = self.named
        self.groups = [module_group(n) for n, _ in named]
        self._before = [_local(p).detach().clone() for _, p in named]

    @torch.no_grad()
    def after(self) -> dict[str, Any]:
        """{"update_ratio": overall, "update_ratio_by_group": {group: ratio}}; a ratio whose
        weights are all zero (LoRA's B before its first step, alone in a group) is None."""
        assert self._before is not None, "before() was not called"
        names = sorted(set(self.groups), key=GROUPS.index)
        sums = torch.zeros(len(names) + 1, 2, dtype=torch.float64)
        for (_, p), old, group in zip(self.named, self._before, self.groups, strict=True):
            old64 = old.double()
            du = float((_local(p).detach().double() - old64).pow(2).sum())
            w = float(old64.pow(2).sum())
            sums[names.index(group)] += torch.tensor([du, w], dtype=torch.float64)
            sums[-1] += torch.tensor([du, w], dtype=torch.float64)
        self._before = None
        if self.sharded:
            import torch.distributed as tdist

            tdist.all_reduce(sums)
        ratios = [math.sqrt(du) / math.sqrt(w) if w > 0 else None for du, w in sums.tolist()]
        return {"update_ratio": ratios[-1],
                "update_ratio_by_group": dict(zip(names, ratios[:-1], strict=True))}


class UpdateRatioWatch:
    """Warns once per episode when the overall ratio stays outside [low, high] for
    `patience` logging steps in a row."""

    def __init__(self, low: float = UPDATE_RATIO_LOW, high: float = UPDATE_RATIO_HIGH,
                 patience: int = UPDATE_RATIO_PATIENCE) -> None:
        self.low, self.high, self.patience = low, high, patience
        self.side: str | None = None
        self.count = 0
        self.warned = False

    def observe(self, step: int, ratio: float | None) -> str | None:
        """The warning to log at this step, if any."""
        if ratio is None:
            return None
        side = "low" if ratio < self.low else "high" if ratio > self.high else None
        if side != self.side:
            self.side, self.count, self.warned = side, 0, False
        if side is None:
            return None
        self.count += 1
        if self.count < self.patience or self.warned:
            return None
        self.warned = True
        if side == "low":
            return (f"update ratio ||update||/||weights|| has stayed below {self.low:g} for "
                    f"{self.count} logging steps (now {ratio:.2e} at step {step}): the weights "
                    "barely move; raise learning_rate or check for vanishing gradients")
        return (f"update ratio ||update||/||weights|| has stayed above {self.high:g} for "
                f"{self.count} logging steps (now {ratio:.2e} at step {step}): each step "
                "rewrites a large part of the weights; lower learning_rate")


def format_ratios(r: dict[str, Any]) -> str:
    """`2.1e-03 (attn 2.3e-03 mlp 1.9e-03)` for the log line."""
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2e}"

    groups = " ".join(f"{g} {f(v)}" for g, v in r["update_ratio_by_group"].items())
    return f"{f(r['update_ratio'])} ({groups})"


class MetricsLog:
    """`<run_dir>/metrics.jsonl`: one JSON object per optimizer step (`"kind": "train"`)
    and per evaluation (`"kind": "eval"`), flushed as written. A resumed run keeps the
    lines up to its starting step and appends after them."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:
                    break
        path.write_text("".join(kept))
        self._f = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line still being written (a run in progress)
    is left out."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
