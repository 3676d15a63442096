"""The trainer's configuration: one frozen dataclass, parsed once at the edge.

A run is described by a YAML file plus `key=value` overrides. Both are checked strictly
before any model loads: unknown keys, wrong types and incompatible combinations are
refused with a message that names them (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

METHODS = ("lora", "qlora", "adapter", "prefix_tuning", "prompt_tuning", "p_tuning", "ia3", "full")
METHOD_CHOICES = (*METHODS, "auto")  # auto: one of METHODS, chosen at start (trainer/auto.py)
SOFT_PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
SCHEDULERS = ("cosine", "constant", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
BEST_METRICS = ("eval_loss", "exact_match", "bleu", "rouge_l")

# Learning rates that work for each method on small instruction models (issue 5).
DEFAULT_LR = {
    "lora": 2e-4,
    "qlora": 2e-4,
    "adapter": 1e-3,
    "prefix_tuning": 3e-3,
    "prompt_tuning": 3e-3,
    "p_tuning": 3e-3,
    "ia3": 3e-3,
    "full": 1e-5,
}

# Keys that only mean something for some methods; setting one for another method is an error.
METHOD_KEYS = {
    "lora_r": ("lora", "qlora"),
    "lora_alpha": ("lora", "qlora"),
    "lora_dropout": ("lora", "qlora"),
    "ia3_target_modules": ("ia3",),
    "ia3_feedforward_modules": ("ia3",),
    "num_virtual_tokens": SOFT_PROMPT_METHODS,
    "prompt_init_text": ("prompt_tuning",),
    "prefix_projection": ("prefix_tuning",),
    "encoder_hidden_size": ("p_tuning", "prefix_tuning"),
    "bottleneck_size": ("adapter",),
    "bottleneck_activation": ("adapter",),
    "bottleneck_positions": ("adapter",),
    "keep_base_quantized": ("auto", "qlora"),
    "memory_budget_mb": ("auto",),
}


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and the limit."""


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    method: str = "lora"  # or auto: chosen at start from data size and memory (trainer/auto.py)
    keep_base_quantized: bool = False  # method auto: the base must stay 4-bit -> qlora
    memory_budget_mb: int | None = None  # method auto: memory to plan for; None: detected
    base_model: str = "default"
    output_dir: str = "adapters/adapter"
    run_dir: str | None = None  # checkpoints, TensorBoard logs; default runs/<output name>
    # data: exactly one of `data` (JSONL file) or `task` (bundled synthetic task)
    data: str | None = None
    eval_data: str | None = None
    task: str | None = None
    task_train_size: int | None = None  # bundled task: how many train examples to use
    val_fraction: float = 0.1
    max_eval_examples: int | None = None  # cap on validation examples (loss and metrics)
    max_seq_len: int = 512
    train_on_prompt: bool = False  # default: loss on the response tokens only
    system_prompt: str | None = None
    # cleaning
    dedup: bool = True
    near_dedup: bool = True
    redact_pii: bool = False
    blocklist: tuple[str, ...] = ()
    # method hyper-parameters
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # lora/qlora; default: all linear layers
    ia3_target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward_modules: tuple[str, ...] = ("down_proj",)
    num_virtual_tokens: int = 16
    prompt_init_text: str = "Read the request carefully and answer in exactly the expected format."
    prefix_projection: bool = False
    encoder_hidden_size: int = 128
    bottleneck_size: int = 32
    bottleneck_activation: str = "gelu"
    bottleneck_positions: tuple[str, ...] = ("attn", "mlp")
    # optimisation
    learning_rate: float | None = None  # None: the method's default (DEFAULT_LR)
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    parallelism: str = "ddp"  # under torchrun: ddp (a full copy per rank) or fsdp (sharded)
    seed: int = 42
    threads: int | None = None  # torch CPU threads; None: torch's default
    # evaluation, checkpoints, logging
    eval_every: int = 50
    save_every: int = 50
    save_total_limit: int = 2
    log_every: int = 10
    early_stopping_patience: int = 0  # evaluations without improvement; 0: off
    metric_for_best: str = "eval_loss"
    load_best: bool = True
    eval_generate_max: int = 64  # examples decoded for task metrics at the end; 0: off
    max_new_tokens: int = 64
    tensorboard: bool = True
    plot: bool = True  # draw <run_dir>/metrics.png from metrics.jsonl at the end of the run
    progress_bar: bool = True
    resume: bool = False
    verify_reload: bool = True  # reload the artifact and compare logits after saving

    @property
    def lr(self) -> float:
        """The learning rate; for method auto (before a method is chosen) the given one or
        nan, never used for training (the loop runs on the resolved config)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LR.get(self.method, float("nan"))

    @property
    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        return Path("runs") / Path(self.output_dir).name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["learning_rate"] = self.lr
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, from_string: bool) -> Any:
    """Convert `value` to the declared type of `key`, or raise ConfigError."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if value is None or (from_string and value in ("null", "None", "none")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if from_string and isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
            value = [v.strip() if isinstance(v, str) else v for v in value if v != ""]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_string:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if from_string:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unhandled type {hint!r} for {key}")  # pragma: no cover


def _unknown(keys: list[str]) -> str:
    import difflib

    parts = []
    for k in keys:
        close = difflib.get_close_matches(k, _FIELDS, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "unknown config key(s): " + ", ".join(parts)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate, return the frozen config."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
        raw = loaded
    bad = sorted(k for k in raw if k not in _FIELDS)
    if bad:
        raise ConfigError(_unknown(bad))
    values = {k: _coerce(k, v, from_string=False) for k, v in raw.items()}
    if isinstance(overrides, list):
        str_over = parse_overrides(overrides)
        from_string = True
    else:
        str_over = dict(overrides or {})
        from_string = False
    bad = sorted(k for k in str_over if k not in _FIELDS)
    if bad:
        raise ConfigError(_unknown(bad))
    for k, v in str_over.items():
        values[k] = _coerce(k, v, from_string=from_string)
    cfg = TrainConfig(**values)
    validate(cfg, given=set(values))
    return cfg


def validate(cfg: TrainConfig, given: set[str] | None = None) -> None:
    """Refuse invalid values and incompatible combinations. `given`: keys the user set."""
    given = given or set()
    errors: list[str] = []
    if cfg.method not in METHOD_CHOICES:
        errors.append(f"method: {cfg.method!r} is not one of {', '.join(METHOD_CHOICES)}")
    else:
        for key, methods in METHOD_KEYS.items():
            if key in given and cfg.method not in methods and cfg.method != "auto":
                errors.append(f"{key} applies to method {'/'.join(methods)}, not {cfg.method}")
        if "target_modules" in given and cfg.method not in ("lora", "qlora", "auto"):
            errors.append(f"target_modules applies to method lora/qlora, not {cfg.method}")
    if (cfg.data is None) == (cfg.task is None):
        errors.append("give exactly one of data (a JSONL file) or task (a bundled task)")
    if cfg.task is not None:
        from trainer.tasks import TASKS

        if cfg.task not in TASKS:
            errors.append(f"task: {cfg.task!r} is not one of {', '.join(TASKS)}")
        if cfg.eval_data is not None:
            errors.append("eval_data cannot be combined with task (the task has its splits)")
    elif "task_train_size" in given:
        errors.append("task_train_size applies only with task")

    def positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not allow_zero):
            errors.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for key in ("batch_size", "grad_accum", "max_seq_len", "lora_r", "lora_alpha",
                "num_virtual_tokens", "encoder_hidden_size", "bottleneck_size", "eval_every",
                "save_every", "log_every", "save_total_limit", "max_new_tokens", "max_steps",
                "task_train_size", "max_eval_examples", "threads", "memory_budget_mb"):
        positive(key, getattr(cfg, key))
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "early_stopping_patience",
                "eval_generate_max"):
        positive(key, getattr(cfg, key), allow_zero=True)
    if cfg.learning_rate is not None and not (0 < cfg.learning_rate < 1):
        errors.append(f"learning_rate: must be in (0, 1), got {cfg.learning_rate}")
    if not 0 <= cfg.val_fraction < 1:
        errors.append(f"val_fraction: must be in [0, 1), got {cfg.val_fraction}")
    if not 0 <= cfg.lora_dropout < 1:
        errors.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        errors.append(f"min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    if not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        errors.append(f"epochs: must be > 0, got {cfg.epochs}")
    if "warmup_steps" in given and "warmup_ratio" in given:
        errors.append("give warmup_steps or warmup_ratio, not both")
    if "max_steps" in given and "epochs" in given:
        errors.append("give max_steps or epochs, not both")
    if cfg.lr_scheduler not in SCHEDULERS:
        errors.append(f"lr_scheduler: {cfg.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if cfg.precision not in PRECISIONS:
        errors.append(f"precision: {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.metric_for_best not in BEST_METRICS:
        errors.append(
            f"metric_for_best: {cfg.metric_for_best!r} is not one of {', '.join(BEST_METRICS)}"
        )
    elif cfg.metric_for_best != "eval_loss" and cfg.eval_generate_max == 0:
        errors.append(f"metric_for_best={cfg.metric_for_best} needs eval_generate_max > 0")
    has_eval = cfg.task is not None or cfg.eval_data is not None or cfg.val_fraction > 0
    if cfg.early_stopping_patience and not has_eval:
        errors.append("early_stopping_patience needs evaluation data (val_fraction > 0, "
                      "eval_data or task)")
    if cfg.bottleneck_activation not in ("gelu", "relu", "silu", "tanh"):
        errors.append(f"bottleneck_activation: {cfg.bottleneck_activation!r} is not one of "
                      "gelu, relu, silu, tanh")
    bad_pos = [p for p in cfg.bottleneck_positions if p not in ("attn", "mlp")]
    if bad_pos or not cfg.bottleneck_positions:
        errors.append(f"bottleneck_positions: {list(cfg.bottleneck_positions)!r} must be a "
                      "non-empty subset of [attn, mlp]")
    if cfg.method == "qlora" and cfg.precision == "fp16":
        errors.append("method qlora with precision fp16 is not supported; use bf16 or fp32")
    if cfg.parallelism not in ("ddp", "fsdp"):
        errors.append(f"parallelism: {cfg.parallelism!r} is not one of ddp, fsdp")
    elif cfg.parallelism == "fsdp":
        if cfg.method not in ("full", "lora", "auto"):
            errors.append(f"parallelism fsdp supports method full and lora, not {cfg.method}")
        if cfg.resume:
            errors.append("resume is not supported with parallelism fsdp (its optimizer state "
                          "is sharded and not checkpointed)")
        if cfg.metric_for_best != "eval_loss":
            errors.append("parallelism fsdp evaluates eval_loss during training; "
                          f"metric_for_best={cfg.metric_for_best} is not supported with it")
        if cfg.precision == "fp16":
            errors.append("parallelism fsdp with precision fp16 is not supported; use bf16")
    if cfg.gradient_checkpointing and cfg.method in SOFT_PROMPT_METHODS:
        errors.append(f"gradient_checkpointing is not supported with method {cfg.method}")
    if cfg.method == "full" and "target_modules" in given:
        errors.append("target_modules does not apply to method full")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from a manifest's `trainer_config` (keys as written by to_dict)."""
    values = {k: _coerce(k, v, from_string=False) for k, v in d.items() if k in _FIELDS}
    return TrainConfig(**values)


def dump_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=False)

