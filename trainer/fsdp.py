"""FSDP (PyTorch FSDP2, `torch.distributed.fsdp.fully_shard`) for `full` and `lora`.

Under `torchrun` with `parallelism: fsdp`, every parameter of the model (the base included)
becomes a DTensor sharded on its first dimension across the ranks: each rank holds about
1/world of the weights, gradients and AdamW moments, and gathers one decoder layer's
weights at a time for its forward and backward. Each decoder layer is its own FSDP unit;
the causal LM (embeddings, final norm, LM head) is the root unit. For LoRA the frozen base
is sharded the same way; only the adapter's shards have gradients and optimizer state.

Gradients are reduce-scattered as a mean over ranks, as DDP all-reduces them, so the loop's
loss scaling (sum over the global batch's trained tokens / their count, times world) is the
same for both. At the end the trainable tensors are gathered whole onto rank 0, which loads
them into a plain (unsharded) copy of the model to evaluate and write the artifact.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from trainer.methods.bottleneck import decoder_layers


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and hasattr(model, "base_model"):
        return model.base_model.model  # PeftModel -> LoraModel -> LlamaForCausalLM
    return model


def shard(model: nn.Module) -> nn.Module:
    """Shard `model` in place: each decoder layer, then the causal LM as the root unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(causal_lm(model))
    return model


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def local_numel(model: nn.Module) -> int:
    """Elements of the parameters this rank holds (its shards)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())


def parameters_per_rank(model: nn.Module) -> list[int]:
    """Every rank's `local_numel` (a collective: all ranks call it)."""
    counts = torch.tensor([local_numel(model)], dtype=torch.int64)
    out = [torch.zeros_like(counts) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, counts)
    return [int(c) for c in out]


@torch.no_grad()
def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole, on the CPU (a collective: all ranks call it; every
    rank gets the result)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if is_sharded(p) else p).detach().cpu().clone()
    return out


def total_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a DTensor's numel is its global size
