"""LoRA adapters in PEFT's format, read from disk into the engine's fused layout.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` for every targeted module. The
engine fuses q/k/v into one projection and gate/up into another; `server.adapters.slots`
arranges the per-module weights read here into that fused layout. A base that fuses them
itself (Phi-3's qkv_proj, gate_up_proj) has one A/B pair over the fused output: read here
as one pair per part, each with the same A and its rows of B (FUSED), which computes the
same per output column.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from server.adapters.buffers import Alloc, fresh
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
# a fused module of the base (Phi-3) -> its parts, in the order of its output columns
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
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

    @functools.cached_property  # the registry sums it over every host entry per load
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b, _ in self.modules.values())


def _pattern_value(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_lora(path: Path, spec: ModelSpec, *, allow_pickle: bool = False,
              alloc: Alloc = fresh) -> LoraWeights:
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
    tensors = _read_tensors(path, allow_pickle, alloc)
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
        if module not in MODULES and module not in FUSED:
            raise AdapterError(f"{path.name}: target module {module!r} is not supported "
                               f"(supported: {', '.join([*MODULES, *FUSED])})")
        if layer >= spec.num_layers:
            raise AdapterError(f"{path.name}: layer {layer} is out of range; the base model "
                               f"has {spec.num_layers} layers (trained for a different base?)")
        raw.setdefault((layer, module), {})[ab] = tensor

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    targets: set[str] = set()
    rank = 0
    for (layer, module), ab in sorted(raw.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path.name}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        parts = FUSED.get(module, (module,))
        group = MODULES[parts[0]][0]
        in_f, outs = shapes[group]
        sizes = [outs[MODULES[p][1]] for p in parts]
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (sum(sizes), r):
            raise AdapterError(
                f"{path.name}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; the base model needs ({r}, {in_f}) and ({sum(sizes)}, {r}) "
                "(trained for a different base?)"
            )
        name = f"model.layers.{layer}.{'self_attn' if group in ('qkv', 'o') else 'mlp'}.{module}"
        a_mod = float(_pattern_value(alpha_pattern, name, alpha))
        scale = a_mod / math.sqrt(r) if use_rslora else a_mod / r
        for part, b_part in zip(parts, b.split(sizes), strict=True):
            if (layer, part) in modules:
                raise AdapterError(f"{path.name}: layer {layer} {part} is targeted twice "
                                   f"(by {module} and by itself or its fused module)")
            modules[(layer, part)] = (a, b_part, scale)
        targets.add(module)
        rank = max(rank, r)
    if not modules:
        raise AdapterError(f"{path.name}: adapter holds no LoRA weights")
    return LoraWeights(
        rank=rank,
        alpha=alpha,
        target_modules=sorted(targets),
        modules=modules,
    )


def _read_tensors(path: Path, allow_pickle: bool, alloc: Alloc = fresh
                  ) -> dict[str, torch.Tensor]:
    """The adapter's tensors; NaN or Inf anywhere fails the load (a non-finite weight
    would poison every row of a batched step, not just this adapter's)."""
    st = path / "adapter_model.safetensors"
    if st.is_file():
        return read_safetensors(st, alloc)
    tensors = _read_pickled(path, allow_pickle)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path.name}: tensor {key!r} contains NaN or Inf")
    return tensors


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path, alloc: Alloc = fresh) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, as views of one buffer (from `alloc`) filled by one
    read, checked finite with one op per run of same-dtype tensors (a check per tensor
    cost more than reading the file: an all-projection LoRA holds 420 tensors).

    Read, not memory-mapped: a mapped file truncated by a writer meanwhile (an upload in
    progress) kills the process with SIGBUS. Every header field is checked against the
    file as the safetensors format requires: tensors exactly tile the data section."""

    def corrupt(why: str) -> AdapterError:
        return AdapterError(f"{path}: corrupt or truncated safetensors file ({why})")

    buf, size = _read_file(path, alloc)
    if len(buf) != size:
        raise corrupt("the file changed while it was read")
    if size < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > size - 8:
        raise corrupt(f"header length {n} exceeds the file's {size} bytes")
    try:
        header = json.loads(buf[8 : 8 + n].tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"tensor {name!r}: bad header entry ({type(e).__name__}: {e})") from e
        if any(d < 0 for d in shape) or not 0 <= start <= end <= data_len \
                or end - start != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"tensor {name!r}: shape {shape} of {info['dtype']} does not fit "
                          f"data offsets [{start}, {end}) of {data_len} data bytes")
        spans.append((start, end, name, dtype, shape))
    spans.sort(key=lambda s: s[:2])
    pos = 0
    for start, end, name, _, _ in spans:
        if start != pos:
            raise corrupt(f"tensor {name!r} overlaps another or leaves a gap before it")
        pos = end
    if pos != data_len:
        raise corrupt(f"{data_len - pos} data bytes belong to no tensor")

    def data(start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Data bytes [start, end) as a flat tensor viewing the buffer."""
        if end == start:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize,
                                offset=8 + n + start)

    tensors = {name: data(start, end, dtype).view(shape)
               for start, end, name, dtype, shape in spans}
    # Same-dtype neighbours are contiguous in the buffer: one check per run. A sum is finite
    # only if every term is (NaN and Inf propagate), and it reads the run once; only a
    # non-finite sum (or an overflow of huge finite values) looks tensor by tensor.
    for dtype, group in itertools.groupby(spans, key=lambda s: s[3]):
        group = list(group)
        start, end = group[0][0], group[-1][1]
        if dtype.is_floating_point and not bool(
                torch.isfinite(data(start, end, dtype).sum(dtype=torch.float32))):
            for _, _, name, _, _ in group:
                if not bool(torch.isfinite(tensors[name]).all()):
                    raise AdapterError(f"{path.parent.name}: tensor {name!r} contains NaN or Inf")
    return tensors


def _read_file(path: Path, alloc: Alloc) -> tuple[np.ndarray, int]:
    """(the bytes read, the file's size at open). O_DIRECT reads from the disk into the
    buffer with no copy through the page cache: the host tier is the adapter cache, and on
    the benchmark VM the page-cache pages cost as much as faulting fresh memory (reading a
    19.6 MB adapter from disk in a process holding 6 GB: 13.5-15 ms p50 with O_DIRECT,
    33-52 ms buffered). A page-cached file is read from disk too; a filesystem that
    refuses O_DIRECT (EINVAL) is read buffered."""
    try:
        return _read_with(path, alloc, os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return _read_with(path, alloc, 0)


def _read_with(path: Path, alloc: Alloc, flags: int) -> tuple[np.ndarray, int]:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        size = os.fstat(fd).st_size
        buf = alloc(size)  # block-aligned, padded to whole blocks as O_DIRECT needs
        got = 0
        while got < size:
            n = os.preadv(fd, [buf[got:]], got)
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    return buf[:got], size


def _read_pickled(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
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
