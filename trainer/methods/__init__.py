"""Methods: turn a base model into a trainable one, save it, and load it back.

PEFT does the work for lora, qlora, ia3, prompt_tuning, prefix_tuning and p_tuning; our
`bottleneck` module does it for `adapter`; `full` trains every weight of the base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import SOFT_PROMPT_METHODS, TrainConfig
from trainer.methods import bottleneck

log = logging.getLogger(__name__)

# The method name the server and the manifest use for each training method.
SERVED_METHOD = {
    "lora": "lora", "qlora": "lora", "ia3": "ia3", "prompt_tuning": "prompt_tuning",
    "p_tuning": "p_tuning", "prefix_tuning": "prefix_tuning", "adapter": "bottleneck",
    "full": "full",
}
MERGEABLE = ("lora", "ia3")
PEFT_METHODS = ("lora", "qlora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")


def load_base(path: str | Path, quantize: str | None = None, device: str = "cpu") -> nn.Module:
    """The base model in float32, or in 4-bit nf4 through bitsandbytes (`quantize="nf4"`)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        if device.startswith("cuda"):
            kwargs["device_map"] = {"": device}
    elif quantize not in (None, "none"):
        raise ValueError(f"quantize {quantize!r} is not one of none, nf4")
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantize == "nf4":
        keep_4bit_kernels_fixed(model)
    else:
        model.to(device)
    return model


def keep_4bit_kernels_fixed(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer run one kernel path in training and in eval.

    On CPUs with `avx512_bf16`, bitsandbytes (0.48 and later) repacks a `Linear4bit`'s
    weight in place the first time the layer runs in eval mode without grad (the trainer's
    evaluation): the block scales (absmax) are rounded to bf16 and the matmul moves to a
    bf16 kernel that has no backward. Nothing repacks the weight back when training resumes,
    so from the first evaluation on the base is computed in bf16 and no gradient flows
    through its linear layers (QLoRA's loss rose instead of falling); saving the state dict
    unpacks it by re-quantizing the rounded scales, so the base no longer equals a fresh
    load of itself (a reloaded adapter then differs from the trained model). The trainer
    needs the dequantize-then-matmul path in both modes: what it trains is what it
    evaluates and what a consumer reloads. Returns the number of layers pinned."""
    pinned = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


def peft_config(cfg: TrainConfig, base_path: str | Path):
    import peft

    task = peft.TaskType.CAUSAL_LM
    m = cfg.method
    if m in ("lora", "qlora"):
        targets = list(cfg.target_modules) if cfg.target_modules else "all-linear"
        return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, target_modules=targets,
                               bias="none", task_type=task)
    if m == "ia3":
        return peft.IA3Config(target_modules=list(cfg.ia3_target_modules),
                              feedforward_modules=list(cfg.ia3_feedforward_modules),
                              task_type=task)
    if m == "prompt_tuning":
        return peft.PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=str(base_path), task_type=task)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.prefix_projection,
                                       encoder_hidden_size=cfg.encoder_hidden_size,
                                       task_type=task)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_hidden_size=cfg.encoder_hidden_size,
            encoder_reparameterization_type=peft.PromptEncoderReparameterizationType.MLP,
            task_type=task)
    raise ValueError(f"method {m!r} is not a PEFT method")


def build_trainable(cfg: TrainConfig, base_path: str | Path, device: str = "cpu") -> nn.Module:
    """Load the base and make exactly the method's parameters trainable."""
    model = load_base(base_path, quantize="nf4" if cfg.method == "qlora" else None,
                      device=device)
    model.config.use_cache = False
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "adapter":
        bcfg = bottleneck.config_for(model, cfg.bottleneck_size, cfg.bottleneck_activation,
                                     cfg.bottleneck_positions)
        bottleneck.apply_bottleneck(model, bcfg)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        return model
    import peft

    if cfg.method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config(cfg, base_path))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (shared tensors once): what a checkpoint stores."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, "
                         f"unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def save_weights(model: nn.Module, method: str, path: Path) -> None:
    """Write the method's weights in its public format into `path` (an existing dir)."""
    if method == "adapter":
        bottleneck.save_bottleneck(path, model.bottleneck)
    elif method == "full":
        model.save_pretrained(str(path), safe_serialization=True)
    else:
        model.save_pretrained(str(path), safe_serialization=True)


def load_for_inference(artifact: str | Path, method: str, base_path: str | Path,
                       device: str = "cpu") -> nn.Module:
    """Load an artifact the way a consumer would: base + adapter files (eval mode)."""
    artifact = Path(artifact)
    if method == "full":
        model = load_base(artifact, device=device)
    elif method == "adapter":
        model = load_base(base_path, device=device)
        config, state = bottleneck.load_bottleneck(artifact)
        bottleneck.apply_bottleneck(model, config, state)
    elif method in PEFT_METHODS:
        import peft

        model = load_base(base_path, quantize="nf4" if method == "qlora" else None,
                          device=device)
        model = peft.PeftModel.from_pretrained(model, str(artifact))
    else:
        raise ValueError(f"unknown method {method!r}")
    model.eval()
    return model


def virtual_token_count(model: nn.Module, method: str) -> int:
    if method in SOFT_PROMPT_METHODS:
        return model.peft_config["default"].num_virtual_tokens
    return 0


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
