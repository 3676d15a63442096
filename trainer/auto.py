"""`method: auto`: pick a training method from the data size, the memory available and
whether the base must stay quantized, and say why.

The rules, in order (the fine-tuning guide's "automatic method selection"):
1. `keep_base_quantized: true` -> qlora: only LoRA over an nf4 base keeps the base 4-bit.
2. At least `FULL_MIN_EXAMPLES` training examples and full fine-tuning fits in memory
   -> full: enough data to move every weight without overfitting.
3. Fewer than `IA3_MAX_EXAMPLES` examples -> ia3 if it fits: the fewest trainable
   parameters (a scale per channel), the hardest to overfit on a handful of examples.
4. Otherwise lora if its float32 base fits, else qlora (nf4 base, about 1/6 of the memory),
   else refuse, naming what each method needs and what is available.

Memory estimates per method, for a base of P parameters (float32, AdamW): full 16 bytes a
parameter (weights, gradients, two moments); lora and ia3 4 bytes (the frozen base; the
adapter is under 1% of it); qlora 0.6 bytes (4-bit weights plus double-quantized scales).
Each is given `HEADROOM` more for activations, the batch and the framework.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

FULL_MIN_EXAMPLES = 10_000
IA3_MAX_EXAMPLES = 200
HEADROOM = 1.5
BYTES_PER_PARAM = {"full": 16.0, "lora": 4.0, "ia3": 4.0, "qlora": 0.6}


@dataclass(frozen=True)
class Choice:
    method: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"method": self.method, "reasons": list(self.reasons)}


class NoMethodFits(ValueError):
    """Not even the smallest method fits the memory available."""


def needed_bytes(method: str, base_params: int) -> float:
    return BYTES_PER_PARAM[method] * base_params * HEADROOM


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_method(n_train: int, base_params: int, memory_bytes: int,
                  keep_base_quantized: bool = False) -> Choice:
    """The method for `n_train` examples, a base of `base_params` parameters and
    `memory_bytes` of memory, with the reasons in the order they were weighed."""
    fits = {m: needed_bytes(m, base_params) <= memory_bytes for m in BYTES_PER_PARAM}
    sizes = (f"base {base_params / 1e6:.1f}M parameters; memory available {_gb(memory_bytes)}; "
             "needs " + ", ".join(f"{m} {_gb(needed_bytes(m, base_params))}"
                                  for m in ("full", "lora", "qlora")))
    reasons = [f"{n_train} training examples; {sizes}"]
    if keep_base_quantized:
        if not fits["qlora"]:
            raise NoMethodFits(f"keep_base_quantized needs qlora, which needs "
                               f"{_gb(needed_bytes('qlora', base_params))}, more than the "
                               f"{_gb(memory_bytes)} available")
        return Choice("qlora", (*reasons, "keep_base_quantized: the base must stay 4-bit, "
                                          "so LoRA over the nf4 base (qlora)"))
    if n_train >= FULL_MIN_EXAMPLES and fits["full"]:
        return Choice("full", (*reasons, f"{n_train} >= {FULL_MIN_EXAMPLES} examples and full "
                                         "fine-tuning fits: train every weight"))
    if n_train >= FULL_MIN_EXAMPLES:
        reasons.append(f"{n_train} >= {FULL_MIN_EXAMPLES} examples, but full fine-tuning "
                       "does not fit")
    else:
        reasons.append(f"{n_train} < {FULL_MIN_EXAMPLES} examples: an adapter, not every "
                       "weight (full fine-tuning overfits and forgets on little data)")
    if n_train < IA3_MAX_EXAMPLES and fits["ia3"]:
        return Choice("ia3", (*reasons, f"{n_train} < {IA3_MAX_EXAMPLES} examples: ia3, the "
                                        "fewest trainable parameters, hardest to overfit"))
    if fits["lora"]:
        return Choice("lora", (*reasons, "lora: its float32 base fits"))
    if fits["qlora"]:
        return Choice("qlora", (*reasons, "lora's float32 base does not fit: qlora "
                                          "(LoRA over a 4-bit nf4 base)"))
    raise NoMethodFits(f"no method fits: {sizes}")


def base_parameter_count(path: str | Path) -> int:
    """Parameters of a model directory, from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {path}: cannot size the base for method auto")
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def available_memory(device: str = "cpu") -> int:
    """Free memory of the CUDA device, else what the OS reports available to this process
    (MemAvailable, or the cgroup's limit minus its usage if that is smaller)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail


def resolve_auto(cfg, base_path: str | Path, n_train: int, device: str = "cpu"):
    """(config with the chosen method, Choice). The method-specific keys of the other
    methods stay in the config and are named in the reasons as unused."""
    from trainer.config import METHOD_KEYS, validate

    memory = (cfg.memory_budget_mb * 2**20 if cfg.memory_budget_mb is not None
              else available_memory(device))
    choice = choose_method(n_train, base_parameter_count(base_path), memory,
                           cfg.keep_base_quantized)
    new = dataclasses.replace(cfg, method=choice.method)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    unused = [k for k, methods in METHOD_KEYS.items()
              if "auto" not in methods and choice.method not in methods
              and getattr(cfg, k) != defaults[k]]
    reasons = list(choice.reasons)
    reasons.append(f"learning_rate {new.lr:g}" + (" (the method's default)"
                                                 if cfg.learning_rate is None else " (given)"))
    if unused:
        reasons.append(f"not used by {choice.method}: {', '.join(unused)}")
    validate(new)  # combinations (qlora with fp16, ...) hold for the chosen method too
    return new, Choice(choice.method, tuple(reasons))


def describe(choice: Choice) -> str:
    return f"method auto -> {choice.method}:\n  - " + "\n  - ".join(choice.reasons)


def dumps(choice: Choice) -> str:
    return json.dumps(choice.to_dict())
