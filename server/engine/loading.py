"""Hugging Face models -> DecoderModel: the config read into a ModelSpec and its weights
copied into the decoder's layout (q/k/v and gate/up fused, Gemma's norms as 1 + weight).

`spec_from_hf_config` accepts only a config of one of FAMILIES whose every switch this
decoder computes exactly as transformers does, and refuses anything else with a
ModelLoadError naming the field; `load_model` reads the weights through transformers and,
with `--quantize`, swaps the layers' projections (server.engine.quant for int8, int4,
bf16, w8a8 and w4a8; server.engine.nf4 for bitsandbytes' nf4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from server.engine.model import ACTIVATIONS, DecoderModel, ModelSpec, RMSNorm
from server.engine.nf4 import Nf4Error, quantize_nf4
from server.engine.quant import MODES as QUANT_MODES
from server.engine.quant import QuantizeError, quantize_model

# model_type: (its causal-LM architecture, the switches of ModelSpec its config implies).
# One decoder serves them all; what sets a family apart is a named switch read here.
FAMILIES = {
    "llama": ("LlamaForCausalLM", lambda c: {
        "qkv_bias": c.attention_bias, "o_bias": c.attention_bias, "mlp_bias": c.mlp_bias}),
    "mistral": ("MistralForCausalLM", lambda c: {}),
    "qwen2": ("Qwen2ForCausalLM", lambda c: {"qkv_bias": True}),  # o_proj has none
    "qwen3": ("Qwen3ForCausalLM", lambda c: {
        "qkv_bias": c.attention_bias, "o_bias": c.attention_bias, "qk_norm": True}),
    "phi3": ("Phi3ForCausalLM", lambda c: {}),  # q/k/v and gate/up fused in the checkpoint
    "gemma3_text": ("Gemma3ForCausalLM", lambda c: {
        "qkv_bias": c.attention_bias, "o_bias": c.attention_bias, "qk_norm": True,
        "gemma": True,
        "attn_scalar": float(c.query_pre_attn_scalar),
        "logit_softcap": float(c.final_logit_softcapping or 0.0),
        "rope_tables": tuple(int(t == "sliding_attention") for t in c.layer_types)}),
}
SUPPORTED_ARCHITECTURES = tuple(arch for arch, _ in FAMILIES.values())
# RoPE types computed exactly: the inverse frequencies (and attention factor) of the
# first four are fixed at load; "longrope" switches from its short to its long factors
# once a forward's sequence is longer than original_max_position_embeddings (see
# ModelSpec.rope_long_from). transformers' "dynamic" recomputes them as the sequence grows
# and is refused, as is anything else.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class ModelLoadError(Exception):
    """A model directory that cannot be served; the message is one line."""


def spec_from_hf_config(cfg) -> ModelSpec:
    """The ModelSpec of a transformers config that this decoder computes exactly as
    transformers does; any other raises ModelLoadError naming the field and its value."""
    archs = getattr(cfg, "architectures", None) or []
    model_type = getattr(cfg, "model_type", None)
    arch, switches = FAMILIES.get(model_type, (None, None))
    if arch not in archs:
        raise ModelLoadError(
            f"architecture {archs} (model_type {model_type!r}) is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    act_field = "hidden_activation" if hasattr(cfg, "hidden_activation") else "hidden_act"
    act = getattr(cfg, act_field, "silu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"{act_field} {act!r} is not supported (supported: "
                             f"{', '.join(ACTIVATIONS)})")
    for field in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(cfg, field, None):
            raise ModelLoadError(f"{field} {getattr(cfg, field)!r} is not supported")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and set(layer_types) - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(f"layer_types {sorted(set(layer_types))} is not supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    # Gemma 3 has one set of parameters per layer type
    per_kind = [rope[t] for t in ("full_attention", "sliding_attention") if t in rope]
    rope_long_from = 0
    for params in per_kind or [rope]:
        rope_type = (params or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"rope_scaling.rope_type {rope_type!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type == "longrope":
            if per_kind:
                raise ModelLoadError("rope_scaling.rope_type 'longrope' is not supported "
                                     "per layer type")
            rope_long_from = int(params.get("original_max_position_embeddings")
                                 or cfg.max_position_embeddings)
        factor = (params or {}).get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ModelLoadError(f"rope_scaling.partial_rotary_factor {factor} is not "
                                 "supported (1.0 only)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    flags = {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "activation": act}
    flags |= switches(cfg)
    return ModelSpec(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        max_positions=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        windows=sliding_windows(cfg),
        rope_long_from=rope_long_from,
        **flags,
    )


def sliding_windows(cfg) -> tuple[int, ...]:
    """ModelSpec.windows of a transformers config: Mistral's and Phi-3's sliding_window on
    every layer (transformers ignores Mistral's layer_types), the others' on their
    sliding_attention layers (Qwen2/3 derive layer_types from use_sliding_window and
    max_window_layers)."""
    window = getattr(cfg, "sliding_window", None) or 0
    if getattr(cfg, "model_type", None) in ("mistral", "phi3"):
        sliding = [True] * cfg.num_hidden_layers
    else:
        sliding = [t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or []]
    return tuple(window if s else 0 for s in sliding) if window and any(sliding) else ()


def load_model(model_dir: Path | str, dtype: torch.dtype, device: torch.device,
               quantize: str = "none") -> DecoderModel:
    """Build a DecoderModel from a Hugging Face model directory (or hub id); with
    quantize int8, int4, bf16, w8a8 or w4a8 the layers' projections become quantized ones
    (server.engine.quant), with nf4 bitsandbytes layers (server.engine.nf4)."""
    if quantize not in ("none", "nf4", *QUANT_MODES):
        raise ModelLoadError(f"quantize {quantize!r} is not one of none, "
                             f"{', '.join(QUANT_MODES)}, nf4")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read model config from {model_dir}: {_first_line(e)}") from e
    spec = spec_from_hf_config(cfg)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except Exception as e:  # any unreadable weights file: one clear line
        raise ModelLoadError(f"cannot load weights from {model_dir}: {_first_line(e)}") from e
    # The family's own rotary class, built afresh: its inv_freq is what
    # transformers.modeling_rope_utils computes for the config's rope type (llama3, linear);
    # Gemma 3's has one per layer type (global: full_attention, local: sliding_attention)
    rotary = type(hf.model.rotary_emb)(hf.config)
    kinds = ("full_attention", "sliding_attention") if spec.rope_tables else ("",)
    # (a kind no layer has gets no table in HF: any other stands in, unused)
    kinds = [k if hasattr(rotary, f"{k}_inv_freq".lstrip("_")) else kinds[-1 - i]
             for i, k in enumerate(kinds)]
    long_inv_freq = None
    if spec.rope_long_from:  # what transformers' longrope update switches to
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            hf.config, None, seq_len=spec.rope_long_from + 1)
    model = DecoderModel(spec, [
        (getattr(rotary, f"{k}_inv_freq".lstrip("_")),
         float(getattr(rotary, f"{k}_attention_scaling".lstrip("_")))) for k in kinds],
        long_inv_freq)
    _copy_weights(hf, model)
    del hf
    upcast = {m: m.weight.detach().clone() for m in model.modules()
              if isinstance(m, RMSNorm) and m.upcast}
    model.to(device=device, dtype=dtype).eval()
    for m, w in upcast.items():  # Gemma's norm weights stay fp32 (RMSNorm)
        m.weight = nn.Parameter(w.to(device))
    if quantize in QUANT_MODES:  # server.engine.quant
        try:
            quantize_model(model, quantize, device, dtype)
        except QuantizeError as e:
            raise ModelLoadError(f"--quantize {quantize}: {e}") from e
    elif quantize == "nf4":  # bitsandbytes (server.engine.nf4)
        try:
            quantize_nf4(model, dtype, device)
        except Nf4Error as e:
            raise ModelLoadError(str(e)) from e
    return model


def _copy_weights(hf, model: DecoderModel) -> None:
    src = hf.model
    with torch.no_grad():
        model.embed.weight.copy_(src.embed_tokens.weight)
        model.norm.weight.copy_(src.norm.weight)
        if not model.spec.tie_word_embeddings:
            model.lm_head.copy_(hf.lm_head.weight)
        for dst, layer in zip(model.layers, src.layers, strict=True):
            att, mlp = layer.self_attn, layer.mlp
            dst.input_norm.weight.copy_(layer.input_layernorm.weight)
            if dst.attn_out_norm is not None:  # Gemma 3: post_attention_layernorm is the
                # attention output's, pre_feedforward_layernorm the MLP input's
                dst.attn_out_norm.weight.copy_(layer.post_attention_layernorm.weight)
                dst.post_norm.weight.copy_(layer.pre_feedforward_layernorm.weight)
                dst.mlp_out_norm.weight.copy_(layer.post_feedforward_layernorm.weight)
            else:
                dst.post_norm.weight.copy_(layer.post_attention_layernorm.weight)
            if dst.q_norm is not None:
                dst.q_norm.weight.copy_(att.q_norm.weight)
                dst.k_norm.weight.copy_(att.k_norm.weight)
            if hasattr(att, "qkv_proj"):  # Phi-3: fused in the checkpoint, in our order
                dst.qkv.load(att.qkv_proj.weight, att.qkv_proj.bias)
                dst.gate_up.load(mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
            else:
                q, k, v = att.q_proj, att.k_proj, att.v_proj
                gate, up = mlp.gate_proj, mlp.up_proj
                dst.qkv.load(torch.cat([q.weight, k.weight, v.weight]),
                             _cat_bias(q.bias, k.bias, v.bias))
                dst.gate_up.load(torch.cat([gate.weight, up.weight]),
                                 _cat_bias(gate.bias, up.bias))
            dst.o.load(att.o_proj.weight, att.o_proj.bias)
            dst.down.load(mlp.down_proj.weight, mlp.down_proj.bias)
        for m in model.modules():
            if isinstance(m, RMSNorm) and m.upcast:  # Gemma scales by 1 + weight (fp32)
                m.weight += 1.0


def _cat_bias(*biases: torch.Tensor | None) -> torch.Tensor | None:
    return None if biases[0] is None else torch.cat(biases)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
