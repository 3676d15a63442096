"""The bottleneck adapter (Houlsby-style): its file format and its formula, for the trainer
that trains and writes it and the server that reads and applies it (PEFT has none).

After the attention block and after the MLP block of every decoder layer, the block's
output `h` (before the residual add) becomes

    h + up(act(down(rmsnorm(h))))        # h: [..., hidden]

with `down: hidden -> size`, `up: size -> hidden` (both with bias) and an RMSNorm with its
own weight (eps from the config). On disk, a directory with
  bottleneck_config.json     BottleneckConfig as JSON ("adapter_type": "bottleneck")
  adapter_model.safetensors  per layer i and position p in ("attn", "mlp"):
      layers.{i}.{p}.norm.weight  [hidden]
      layers.{i}.{p}.down.weight  [size, hidden]    layers.{i}.{p}.down.bias  [size]
      layers.{i}.{p}.up.weight    [hidden, size]    layers.{i}.{p}.up.bias    [hidden]
(float32).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
               "silu": torch.nn.functional.silu, "tanh": torch.tanh}


@dataclass(frozen=True)
class BottleneckConfig:
    hidden_size: int
    num_layers: int
    bottleneck_size: int = 32
    activation: str = "gelu"
    positions: tuple[str, ...] = ("attn", "mlp")
    norm_eps: float = 1e-5
    base_model_name_or_path: str = ""
    adapter_type: str = "bottleneck"
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["positions"] = list(self.positions)
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BottleneckConfig:
        """Raises ValueError naming what is wrong."""
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("adapter_type") != "bottleneck":
            raise ValueError(f"adapter_type {d.get('adapter_type') if isinstance(d, dict) else d!r}"
                             " is not 'bottleneck'")
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"bottleneck format_version {d['format_version']} is newer than "
                             f"supported version {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown keys in {CONFIG_NAME}: {unknown}")
        if d.get("activation", "gelu") not in ACTIVATIONS:
            raise ValueError(f"activation {d['activation']!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")
        d["positions"] = tuple(d.get("positions", ("attn", "mlp")))
        return cls(**d)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the weights file must hold, by name."""
        h, size = self.hidden_size, self.bottleneck_size
        shapes = {"norm.weight": (h,), "down.weight": (size, h), "down.bias": (size,),
                  "up.weight": (h, size), "up.bias": (h,)}
        return {f"layers.{i}.{p}.{n}": s for i in range(self.num_layers)
                for p in self.positions for n, s in shapes.items()}


def bottleneck_delta(h: torch.Tensor, w: dict[str, torch.Tensor], activation: str,
                     eps: float) -> torch.Tensor:
    """up(act(down(rmsnorm(h)))), the adapter's residual branch, for h [..., hidden]; `w`
    holds norm.weight, down.weight, down.bias, up.weight, up.bias. Computed in float32."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w["norm.weight"].float()
    x = torch.nn.functional.linear(x, w["down.weight"].float(), w["down.bias"].float())
    x = ACTIVATIONS[activation](x)
    x = torch.nn.functional.linear(x, w["up.weight"].float(), w["up.bias"].float())
    return x.to(h.dtype)
