"""Reading every adapter type from disk into plain host-memory weights.

PEFT's formats for LoRA (see lora.py), IA3, prompt tuning, P-tuning and prefix tuning,
and our bottleneck adapter (adapter_format.bottleneck defines it); which reader a
directory takes is its kind's (kinds.py, `read_adapter`). Every reader checks shapes
against the base model, so an adapter made for another base fails its own load with a
message naming the tensor and both shapes.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_format.bottleneck import CONFIG_NAME as BOTTLENECK_CONFIG
from adapter_format.bottleneck import BottleneckConfig
from server.adapters.buffers import Alloc, fresh
from server.adapters.lora import (
    FUSED,
    MODULES,
    AdapterError,
    LoraWeights,
    _read_tensors,
)
from server.engine.model import ModelSpec

_IA3_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
    r"\.ia3_l(?:\.[^.]+)?$"
)
# IA3 scales the input of these modules (PEFT's feedforward_modules) only where the
# engine does not fuse the module with others.
_INPUT_SCALED_OK = ("o_proj", "down_proj")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class IA3Weights:
    """out_scale[(layer, module)] [out] multiplies the module's output;
    in_scale[(layer, module)] [in] multiplies its input (o_proj and down_proj only)."""

    target_modules: list[str]
    out_scale: dict[tuple[int, str], torch.Tensor] = field(repr=False)
    in_scale: dict[tuple[int, str], torch.Tensor] = field(repr=False)
    rank: int = 0

    @functools.cached_property
    def nbytes(self) -> int:
        return _nbytes([*self.out_scale.values(), *self.in_scale.values()])


@dataclass
class PromptWeights:
    """Virtual token embeddings [n, hidden] placed before the prompt (prompt tuning, and
    P-tuning whose prompt encoder output PEFT saves as these embeddings)."""

    embeddings: torch.Tensor = field(repr=False)
    target_modules: list[str] = field(default_factory=list)
    rank: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @functools.cached_property
    def nbytes(self) -> int:
        return _nbytes([self.embeddings])


@dataclass
class PrefixWeights:
    """Per-layer key and value prefixes [kv_heads, n, head_dim] (P-Tuning v2), placed in
    the first n positions of the row's KV cache."""

    keys: list[torch.Tensor] = field(repr=False)
    values: list[torch.Tensor] = field(repr=False)
    target_modules: list[str] = field(default_factory=list)
    rank: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys[0].shape[1]

    @functools.cached_property
    def nbytes(self) -> int:
        return _nbytes([*self.keys, *self.values])


@dataclass
class BottleneckWeights:
    """layers[(layer, position)] = {norm.weight, down.weight, down.bias, up.weight, up.bias}
    for positions "attn" (after o_proj) and "mlp" (after down_proj)."""

    activation: str
    eps: float
    size: int
    layers: dict[tuple[int, str], dict[str, torch.Tensor]] = field(repr=False)
    target_modules: list[str] = field(default_factory=list)
    rank: int = 0

    @functools.cached_property
    def nbytes(self) -> int:
        return _nbytes([t for w in self.layers.values() for t in w.values()])


AdapterWeights = LoraWeights | IA3Weights | PromptWeights | PrefixWeights | BottleneckWeights


def read_ia3(path: Path, spec: ModelSpec, *, allow_pickle: bool = False,
             alloc: Alloc = fresh) -> IA3Weights:
    cfg = _read_json(path / "adapter_config.json")
    tensors = _read_tensors(path, allow_pickle, alloc)
    return _read_ia3(path, cfg, tensors, spec)


def read_prompt(path: Path, spec: ModelSpec, method: str, *, allow_pickle: bool = False,
                alloc: Alloc = fresh) -> PromptWeights:
    """Prompt tuning and P-tuning (`method` names which, for the messages)."""
    emb, n = _virtual_embeddings(path, method, allow_pickle, alloc)
    if emb.shape != (n, spec.hidden_size):
        raise AdapterError(f"{path.name}: prompt_embeddings has shape {tuple(emb.shape)}; "
                           f"the base model needs ({n}, {spec.hidden_size}) "
                           "(trained for a different base?)")
    return PromptWeights(emb)


def read_prefix(path: Path, spec: ModelSpec, *, allow_pickle: bool = False,
                alloc: Alloc = fresh) -> PrefixWeights:
    emb, n = _virtual_embeddings(path, "prefix_tuning", allow_pickle, alloc)
    if spec.windows:  # where a window would hide the prefix is untested against PEFT
        raise AdapterError(f"{path.name}: prefix tuning is not supported on a base with "
                           "sliding-window attention")
    width = spec.num_layers * 2 * spec.kv_size
    if emb.shape != (n, width):
        raise AdapterError(f"{path.name}: prefix prompt_embeddings has shape "
                           f"{tuple(emb.shape)}; the base model needs ({n}, {width}) = "
                           f"(virtual tokens, layers*2*kv_heads*head_dim) "
                           "(trained for a different base?)")
    kv = emb.view(n, spec.num_layers * 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 0, 3)
    return PrefixWeights([kv[2 * i].contiguous() for i in range(spec.num_layers)],
                         [kv[2 * i + 1].contiguous() for i in range(spec.num_layers)])


def _virtual_embeddings(path: Path, method: str, allow_pickle: bool,
                        alloc: Alloc) -> tuple[torch.Tensor, int]:
    """PEFT's saved prompt_embeddings (fp32) and the number of virtual tokens."""
    cfg = _read_json(path / "adapter_config.json")
    tensors = _read_tensors(path, allow_pickle, alloc)
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise AdapterError(f"{path.name}: no prompt_embeddings tensor for {method}")
    emb = emb.float()
    return emb, int(cfg.get("num_virtual_tokens") or emb.shape[0])


def _read_ia3(path: Path, cfg: dict, tensors: dict, spec: ModelSpec) -> IA3Weights:
    from server.adapters.lora import group_shapes

    shapes = group_shapes(spec)
    out_scale, in_scale = {}, {}
    names: set[str] = set()
    for key, t in tensors.items():
        m = _IA3_KEY.match(key)
        if not m:
            raise AdapterError(f"{path.name}: tensor {key!r} is not a supported IA3 weight")
        layer, module = int(m.group(1)), m.group(2)
        if module not in MODULES and module not in FUSED or layer >= spec.num_layers:
            raise AdapterError(f"{path.name}: IA3 target layer {layer} {module!r} does not "
                               "exist in the base model")
        parts = FUSED.get(module, (module,))  # a fused module's vector, split by part
        group = MODULES[parts[0]][0]
        in_f, outs = shapes[group]
        sizes = [outs[MODULES[p][1]] for p in parts]
        vec = t.float().reshape(-1)
        if t.shape[0] == 1 and t.dim() == 2:  # [1, in]: scales the input
            if module not in _INPUT_SCALED_OK:
                raise AdapterError(f"{path.name}: IA3 input scaling of {module} is not "
                                   f"supported (only {', '.join(_INPUT_SCALED_OK)})")
            want = in_f
            in_scale[(layer, module)] = vec
        else:
            want = sum(sizes)
        if vec.numel() != want:
            raise AdapterError(f"{path.name}: layer {layer} {module} IA3 vector has "
                               f"{vec.numel()} entries; the base model needs {want} "
                               "(trained for a different base?)")
        if (layer, module) not in in_scale:
            out_scale.update({(layer, p): v for p, v in zip(parts, vec.split(sizes),
                                                             strict=True)})
        names.add(module)
    if not out_scale and not in_scale:
        raise AdapterError(f"{path.name}: adapter holds no IA3 weights")
    targets = sorted(names)
    return IA3Weights(targets, out_scale, in_scale)


def read_bottleneck(path: Path, spec: ModelSpec) -> BottleneckWeights:
    try:
        cfg = BottleneckConfig.from_json((path / BOTTLENECK_CONFIG).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{path / BOTTLENECK_CONFIG}: {e}") from e
    if cfg.hidden_size != spec.hidden_size or cfg.num_layers != spec.num_layers:
        raise AdapterError(
            f"{path.name}: bottleneck adapter for hidden_size {cfg.hidden_size} and "
            f"{cfg.num_layers} layers; the base model has {spec.hidden_size} and "
            f"{spec.num_layers} (trained for a different base?)")
    tensors = _read_tensors(path, allow_pickle=False)
    for key, shape in cfg.tensor_shapes().items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise AdapterError(f"{path.name}: {key} has shape {got}, expected {shape}")
    layers = {(i, p): {n: tensors[f"layers.{i}.{p}.{n}"].float()
                       for n in ("norm.weight", "down.weight", "down.bias", "up.weight", "up.bias")}
              for i in range(cfg.num_layers) for p in cfg.positions}
    return BottleneckWeights(cfg.activation, cfg.norm_eps, cfg.bottleneck_size, layers)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from e
