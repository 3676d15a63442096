"""One class per adapter type: everything the server does differently for each type.

`ADAPTER_TYPES` maps a method (PEFT's peft_type in lower case, or "bottleneck") to its
class; an adapter's class is its kind (`AdapterEntry.kind`). The registry, the step
packer, the hooks and the engine ask the kind instead of testing the method string or
the weights' type, so a new type is one new class here (its reader in formats.py). The
classes are namespaces of static answers, never instantiated.

    kind              weights            on the device             in a step
    LoraKind          LoraWeights        a slot of its rank        LoraHooks (slots.py)
                                         bucket's table
    IA3Kind           IA3Weights         its own tensors           input_scale, linear on
    BottleneckKind    BottleneckWeights  (to_device)               its row range
    PromptTuningKind, PromptWeights      its own tensors           input_embeddings of its
    PTuningKind                                                    virtual tokens
    PrefixTuningKind  PrefixWeights      its own tensors           prefix_kv written into
                                                                   the row's cache once
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from adapter_format.bottleneck import CONFIG_NAME as BOTTLENECK_CONFIG
from adapter_format.bottleneck import bottleneck_delta
from server.adapters.buffers import Alloc, fresh
from server.adapters.formats import (
    AdapterWeights,
    _read_json,
    read_bottleneck,
    read_ia3,
    read_prefix,
    read_prompt,
)
from server.adapters.lora import AdapterError, read_lora
from server.engine.model import ModelSpec

PEFT_CONFIG = "adapter_config.json"
# Modules: (name, index in group, first output column, output size) per group; the
# slot tables' `group_modules(spec)`.
Modules = list[tuple[str, int, int, int]]


class AdapterKind:
    """The interface, with the answers of a type that has none of the features."""

    method: ClassVar[str]  # as ListAdapters reports it
    config_file: ClassVar[str] = PEFT_CONFIG  # the file that marks (and configures) it
    uses_lora_slot: ClassVar[bool] = False  # written into a LoRA slot table, else to_device
    range_ops: ClassVar[bool] = False  # input_scale / linear on its rows in every step
    writes_prefix: ClassVar[bool] = False  # prefix_kv placed in the row's cache at admission

    @classmethod
    def read(cls, path: Path, spec: ModelSpec, *, allow_pickle: bool = False,
             alloc: Alloc = fresh) -> AdapterWeights:
        """Its weights in host memory, checked against the base model (AdapterError)."""
        raise NotImplementedError

    @staticmethod
    def config_rank(cfg: dict) -> int:
        """The rank from its config file alone (the disk tier's summary)."""
        return 0

    @staticmethod
    def virtual_tokens(weights: AdapterWeights) -> int:
        """Positions it places before the prompt."""
        return 0

    @staticmethod
    def to_device(weights: AdapterWeights, dtype: torch.dtype, device) -> AdapterWeights:
        """A copy of its tensors in the engine's dtype and device (kinds without a LoRA
        slot; the copy is `AdapterEntry.device_weights`)."""

        def conv(value):
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype)
            if isinstance(value, dict):
                return {k: conv(v) for k, v in value.items()}
            if isinstance(value, list):
                return [conv(v) for v in value]
            return value

        return dataclasses.replace(weights, **{f.name: conv(getattr(weights, f.name))
                                               for f in dataclasses.fields(weights)})

    @staticmethod
    def input_embeddings(weights: AdapterWeights) -> torch.Tensor | None:
        """[virtual tokens, hidden]: the input embeddings of its virtual tokens (a soft
        prompt), or None."""
        return None

    @staticmethod
    def prefix_kv(weights: AdapterWeights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer keys and values [kv_heads, virtual tokens, head_dim] for the first
        cache positions (writes_prefix kinds only)."""
        raise TypeError("this adapter type writes no prefix")

    @staticmethod
    def input_scale(weights: AdapterWeights, layer: int, group: str) -> torch.Tensor | None:
        """A vector multiplying its rows of the input of the group's projection, or None
        (range_ops kinds)."""
        return None

    @staticmethod
    def linear(weights: AdapterWeights, layer: int, group: str, out: torch.Tensor,
               start: int, end: int, modules: Modules) -> None:
        """Change rows start:end of the group's projection output in place (range_ops
        kinds); `modules` locates the group's modules in its columns."""


class LoraKind(AdapterKind):
    method = "lora"
    uses_lora_slot = True

    @classmethod
    def read(cls, path, spec, *, allow_pickle=False, alloc=fresh):
        return read_lora(path, spec, allow_pickle=allow_pickle, alloc=alloc)

    @staticmethod
    def config_rank(cfg):
        return int(cfg.get("r") or 0)

    @staticmethod
    def to_device(weights, dtype, device):
        raise TypeError("LoRA weights go into a slot table (SlotBuckets.write)")


_INPUT_MODULE = {"o": "o_proj", "down": "down_proj"}


class IA3Kind(AdapterKind):
    """y[rows, cols(m)] *= l_m (output scaling, e.g. k_proj, v_proj);
    x[rows] *= l_m before m (input scaling: o_proj, down_proj)."""

    method = "ia3"
    range_ops = True

    @classmethod
    def read(cls, path, spec, *, allow_pickle=False, alloc=fresh):
        return read_ia3(path, spec, allow_pickle=allow_pickle, alloc=alloc)

    @staticmethod
    def input_scale(weights, layer, group):
        return weights.in_scale.get((layer, _INPUT_MODULE.get(group)))

    @staticmethod
    def linear(weights, layer, group, out, start, end, modules):
        for name, _, off, size in modules:
            vec = weights.out_scale.get((layer, name))
            if vec is not None:
                out[start:end, off : off + size] *= vec


_POSITION = {"o": "attn", "down": "mlp"}


class BottleneckKind(AdapterKind):
    """y[rows] += up(act(down(rmsnorm(y[rows])))) after o_proj and down_proj."""

    method = "bottleneck"
    config_file = BOTTLENECK_CONFIG
    range_ops = True

    @classmethod
    def read(cls, path, spec, *, allow_pickle=False, alloc=fresh):
        return read_bottleneck(path, spec)  # safetensors only, never pickle

    @staticmethod
    def linear(weights, layer, group, out, start, end, modules):
        position = _POSITION.get(group)
        if position is None:
            return
        w = weights.layers.get((layer, position))
        if w is not None:
            out[start:end] += bottleneck_delta(out[start:end], w, weights.activation,
                                               weights.eps)


class PromptTuningKind(AdapterKind):
    """Virtual tokens whose input embeddings are the adapter's, before the prompt."""

    method = "prompt_tuning"

    @classmethod
    def read(cls, path, spec, *, allow_pickle=False, alloc=fresh):
        return read_prompt(path, spec, cls.method, allow_pickle=allow_pickle, alloc=alloc)

    @staticmethod
    def virtual_tokens(weights):
        return weights.num_virtual_tokens

    @staticmethod
    def input_embeddings(weights):
        return weights.embeddings


class PTuningKind(PromptTuningKind):
    """PEFT saves the prompt encoder's output: the same soft prompt at serving time."""

    method = "p_tuning"


class PrefixTuningKind(AdapterKind):
    """Virtual positions whose keys and values are the adapter's, in every layer."""

    method = "prefix_tuning"
    writes_prefix = True

    @classmethod
    def read(cls, path, spec, *, allow_pickle=False, alloc=fresh):
        return read_prefix(path, spec, allow_pickle=allow_pickle, alloc=alloc)

    @staticmethod
    def virtual_tokens(weights):
        return weights.num_virtual_tokens

    @staticmethod
    def prefix_kv(weights):
        return weights.keys, weights.values


ADAPTER_TYPES: dict[str, type[AdapterKind]] = {k.method: k for k in (
    LoraKind, IA3Kind, PromptTuningKind, PTuningKind, PrefixTuningKind, BottleneckKind)}
METHODS = tuple(ADAPTER_TYPES)
# the files that make a directory an adapter (PEFT's config first)
CONFIG_FILES = tuple(dict.fromkeys(k.config_file for k in ADAPTER_TYPES.values()))


def method_of(path: Path) -> str:
    """The adapter type of a directory: a kind's own config file, else PEFT's peft_type."""
    for method, kind in ADAPTER_TYPES.items():
        if kind.config_file != PEFT_CONFIG and (path / kind.config_file).is_file():
            return method
    cfg = path / PEFT_CONFIG
    if not cfg.is_file():
        raise AdapterError(f"{path}: no {' or '.join(CONFIG_FILES)}")
    peft_type = str(_read_json(cfg).get("peft_type", "")).lower()
    if peft_type not in ADAPTER_TYPES:
        raise AdapterError(f"{cfg}: peft_type {peft_type or None!r} is not supported "
                           f"(supported: {', '.join(METHODS)})")
    return peft_type


def read_adapter(path: Path, spec: ModelSpec, *, allow_pickle: bool = False,
                 alloc: Alloc = fresh) -> tuple[str, AdapterWeights]:
    """An adapter's method and weights, checked against the base model; `alloc` gives the
    buffers that safetensors files are read into."""
    method = method_of(path)
    return method, ADAPTER_TYPES[method].read(path, spec, allow_pickle=allow_pickle,
                                              alloc=alloc)
