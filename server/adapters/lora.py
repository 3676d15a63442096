"""LoRA adapters in PEFT's format, read from disk into the engine's fused layout.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` for every targeted module. The
engine fuses q/k/v into one projection and gate/up into another; `server.adapters.slots`
arranges the per-module weights read here into that fused layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from server.engine.model import ModelSpec

GROUPS = ("qkv", "o", "gate_up", "down")
# module name -> (group, index of the module inside its group)
MODULES = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


class AdapterError(Exception):
    """An adapter that cannot be loaded; the message names the file, field and limit."""


def group_shapes(spec: ModelSpec) -> dict[str, tuple[int, list[int]]]:
    """group -> (input features, output features of each module in the group)."""
    return {
        "qkv": (spec.hidden_size, [spec.q_size, spec.kv_size, spec.kv_size]),
        "o": (spec.q_size, [spec.hidden_size]),
        "gate_up": (spec.hidden_size, [spec.intermediate_size, spec.intermediate_size]),
        "down": (spec.intermediate_size, [spec.hidden_size]),
    }


@dataclass
class LoraWeights:
    """An adapter in host memory: per (layer, module) PEFT's A [r, in], B [out, r] and the
    module's scale (alpha / r, or alpha / sqrt(r) for rsLoRA)."""

    rank: int
    alpha: float
    target_modules: list[str]
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b, _ in self.modules.values())


def _pattern_value(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_lora(path: Path, spec: ModelSpec, *, allow_pickle: bool = False) -> LoraWeights:
    """Read a PEFT LoRA directory and check every shape against the base model."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: unreadable adapter config ({e})") from e
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type or None!r} is not LORA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise AdapterError(f"{cfg_path}: {key}={bad} is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{cfg_path}: modules_to_save is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    tensors = _read_tensors(path, allow_pickle)
    alpha = float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    shapes = group_shapes(spec)

    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"{path.name}: tensor {key!r} is not a supported LoRA weight "
                               "(only q/k/v/o/gate/up/down projections of decoder layers)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULES:
            raise AdapterError(f"{path.name}: target module {module!r} is not supported "
                               f"(supported: {', '.join(MODULES)})")
        if layer >= spec.num_layers:
            raise AdapterError(f"{path.name}: layer {layer} is out of range; the base model "
                               f"has {spec.num_layers} layers (trained for a different base?)")
        raw.setdefault((layer, module), {})[ab] = tensor

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    rank = 0
    for (layer, module), ab in sorted(raw.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path.name}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        group, idx = MODULES[module]
        in_f, outs = shapes[group]
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (outs[idx], r):
            raise AdapterError(
                f"{path.name}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; the base model needs ({r}, {in_f}) and ({outs[idx]}, {r}) "
                "(trained for a different base?)"
            )
        name = f"model.layers.{layer}.{'self_attn' if group in ('qkv', 'o') else 'mlp'}.{module}"
        a_mod = float(_pattern_value(alpha_pattern, name, alpha))
        scale = a_mod / math.sqrt(r) if use_rslora else a_mod / r
        modules[(layer, module)] = (a, b, scale)
        rank = max(rank, r)
    if not modules:
        raise AdapterError(f"{path.name}: adapter holds no LoRA weights")
    return LoraWeights(
        rank=rank,
        alpha=alpha,
        target_modules=sorted({m for _, m in modules}),
        modules=modules,
    )


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The adapter's tensors; NaN or Inf anywhere fails the load (a non-finite weight
    would poison every row of a batched step, not just this adapter's)."""
    tensors = _read_raw(path, allow_pickle)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path.name}: tensor {key!r} contains NaN or Inf")
    return tensors


def _read_raw(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        # Read the bytes, then parse: a file mapped into memory and truncated meanwhile by a
        # writer (an upload in progress) would kill the process with SIGBUS.
        try:
            return load_safetensors(st.read_bytes())
        except Exception as e:
            raise AdapterError(f"{st}: corrupt or truncated safetensors file ({e})") from e
    pickled = path / "adapter_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterError(f"{pickled}: pickled weights are refused (start the server "
                               "with --allow-pickle to load them)")
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{pickled}: unreadable weights ({e})") from e
    raise AdapterError(f"{path}: no adapter_model.safetensors")
