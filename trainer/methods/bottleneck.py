"""Bottleneck adapters (Houlsby-style) for training: modules injected into an HF causal LM
with forward hooks. The format and the formula are `adapter_format.bottleneck`'s, which
the server uses too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_format.bottleneck import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    BottleneckConfig,
    bottleneck_delta,
)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        self.activation = activation
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = {"norm.weight": self.norm.weight, "down.weight": self.down.weight,
             "down.bias": self.down.bias, "up.weight": self.up.weight, "up.bias": self.up.bias}
        return h + bottleneck_delta(h, w, self.activation, self.norm.eps)


class BottleneckAdapters(nn.Module):
    """All adapters of one model; `state_dict()` keys are the on-disk tensor names."""

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                p: Bottleneck(config.hidden_size, config.bottleneck_size, config.activation,
                              config.norm_eps)
                for p in config.positions
            })
            for _ in range(config.num_layers)
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (LlamaForCausalLM: model.model.layers)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            hasattr(m, "self_attn") and hasattr(m, "mlp") for m in module
        ):
            return module
    raise ValueError("no decoder layers with self_attn and mlp found in the model")


def config_for(model: nn.Module, bottleneck_size: int = 32, activation: str = "gelu",
               positions: tuple[str, ...] = ("attn", "mlp")) -> BottleneckConfig:
    cfg = model.config
    return BottleneckConfig(
        hidden_size=cfg.hidden_size, num_layers=len(decoder_layers(model)),
        bottleneck_size=bottleneck_size, activation=activation, positions=tuple(positions),
        norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)),
        base_model_name_or_path=str(getattr(cfg, "name_or_path", "")),
    )


def _attn_hook(adapter: Bottleneck):
    def hook(module, args, output):  # self_attn returns (attn_output, attn_weights, ...)
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)
    return hook


def _mlp_hook(adapter: Bottleneck):
    def hook(module, args, output):
        return adapter(output)
    return hook


def apply_bottleneck(model: nn.Module, config: BottleneckConfig,
                     state_dict: dict[str, torch.Tensor] | None = None) -> BottleneckAdapters:
    """Inject adapters into `model` in place (as `model.bottleneck` plus forward hooks).

    With `state_dict`, its weights are loaded strictly (names and shapes must match).
    Returns the adapters module; `remove_bottleneck(model)` undoes the injection.
    """
    layers = decoder_layers(model)
    if len(layers) != config.num_layers:
        raise ValueError(f"adapter has {config.num_layers} layers, model has {len(layers)}")
    if model.config.hidden_size != config.hidden_size:
        raise ValueError(f"adapter hidden_size {config.hidden_size} != model hidden_size "
                         f"{model.config.hidden_size}")
    remove_bottleneck(model)
    param = next(model.parameters())
    adapters = BottleneckAdapters(config).to(device=param.device)
    if state_dict is not None:
        adapters.load_state_dict(state_dict, strict=True)
    model.add_module("bottleneck", adapters)
    handles = []
    for layer, mods in zip(layers, adapters.layers, strict=True):
        if "attn" in mods:
            handles.append(layer.self_attn.register_forward_hook(_attn_hook(mods["attn"])))
        if "mlp" in mods:
            handles.append(layer.mlp.register_forward_hook(_mlp_hook(mods["mlp"])))
    model._bottleneck_hooks = handles
    return adapters


def remove_bottleneck(model: nn.Module) -> None:
    for h in getattr(model, "_bottleneck_hooks", []):
        h.remove()
    model._bottleneck_hooks = []
    if "bottleneck" in model._modules:
        del model._modules["bottleneck"]


def save_bottleneck(path: str | Path, adapters: BottleneckAdapters) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(adapters.config.to_json())
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in adapters.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def load_bottleneck(path: str | Path) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """Read and check a bottleneck adapter directory; returns (config, state_dict)."""
    path = Path(path)
    config = BottleneckConfig.from_json((path / CONFIG_NAME).read_text())
    state = load_file(str(path / WEIGHTS_NAME))
    expected = config.tensor_shapes()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"bottleneck weights do not match config: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"tensor {k} has shape {tuple(state[k].shape)}, expected {shape}")
    return config, state
