"""The decoder as one ONNX-exportable graph with an explicit KV cache.

One graph serves prefill and decode. Shapes (B batch, S new tokens, P past tokens,
T = P + S, KV kv heads, D head dim):

    inputs   input_ids [B, S] int64, position_ids [B, S] int64,
             attention_mask [B, T] int64 (1 = a real token, 0 = a hole or padding),
             past_key_values.{i}.key / .value [B, KV, P, D] float32
    outputs  logits [B, V] float32 (the last new token of each row only),
             present.{i}.key / .value [B, KV, T, D] = concat(past, new)

Rows may hold holes (masked entries) anywhere in their past: positions come from
position_ids, so a row's attention result does not depend on where its cache entries sit.
Weights are stored as [in, out] matrices so that every projection is a plain MatMul with
a constant right operand, the pattern ONNX Runtime's MatMulNBits quantizer rewrites.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.loading import sliding_windows


class _Layer(nn.Module):
    def __init__(self, hidden: int, qkv: int, inter: int, q_size: int) -> None:
        super().__init__()
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Parameter(torch.empty(hidden, qkv))
        self.o = nn.Parameter(torch.empty(q_size, hidden))
        self.gate_up = nn.Parameter(torch.empty(hidden, 2 * inter))
        self.down = nn.Parameter(torch.empty(inter, hidden))
        self.qkv_bias: nn.Parameter | None = None
        self.o_bias: nn.Parameter | None = None


class ExportDecoder(nn.Module):
    """A Llama decoder (fp32) built from a Hugging Face LlamaForCausalLM's weights."""

    def __init__(self, hf) -> None:
        super().__init__()
        cfg = hf.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = float(cfg.rms_norm_eps)
        if cfg.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"model_type {cfg.model_type!r} is not supported by the ONNX "
                             "export (Llama-style bases only)")
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported by the ONNX export")
        if hasattr(hf.model.layers[0].self_attn, "q_norm"):
            raise ValueError("per-head q/k norms (q_norm, k_norm: Qwen3, Gemma 3) are not "
                             "supported by the ONNX export")
        if any(sliding_windows(cfg)):
            raise ValueError(f"sliding-window attention (sliding_window {cfg.sliding_window}) "
                             "is not supported by the ONNX export")
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        src = hf.model
        self.embed = nn.Parameter(src.embed_tokens.weight.detach().float().clone())
        self.norm = nn.Parameter(src.norm.weight.detach().float().clone())
        self.lm_head = nn.Parameter(hf.lm_head.weight.detach().float().T.contiguous())
        rotary = src.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone())
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.layers = nn.ModuleList()
        for layer in src.layers:
            att, mlp = layer.self_attn, layer.mlp
            dst = _Layer(cfg.hidden_size, q_size + 2 * kv_size, cfg.intermediate_size, q_size)
            with torch.no_grad():
                dst.input_norm.copy_(layer.input_layernorm.weight)
                dst.post_norm.copy_(layer.post_attention_layernorm.weight)
                dst.qkv.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight,
                                         att.v_proj.weight]).T)
                dst.o.copy_(att.o_proj.weight.T)
                dst.gate_up.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T)
                dst.down.copy_(mlp.down_proj.weight.T)
                if att.q_proj.bias is not None:
                    dst.qkv_bias = nn.Parameter(torch.cat([att.q_proj.bias, att.k_proj.bias,
                                                           att.v_proj.bias]).detach().clone())
                if att.o_proj.bias is not None:
                    dst.o_bias = nn.Parameter(att.o_proj.bias.detach().clone())
            self.layers.append(dst)
        self.eval()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, input_ids, position_ids, attention_mask, *past):
        b, s = input_ids.shape
        p = past[0].shape[2]
        kvh, g, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        x = self.embed[input_ids]  # [B, S, H]
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, D]
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        # query j sits at buffer index p + j: it sees keys at indices <= p + j that are real
        keys = torch.arange(p + s, device=input_ids.device)
        queries = torch.arange(s, device=input_ids.device) + p
        allowed = (keys[None, :] <= queries[:, None])[None] & (attention_mask[:, None, :] > 0)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # [B, S, T]
        bias = bias[:, None, None]  # [B, 1, 1, S, T]
        presents = []
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.input_norm)
            qkv = h @ layer.qkv
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = _rope(q.view(b, s, -1, d).transpose(1, 2), cos, sin)  # [B, Hq, S, D]
            k = _rope(k.view(b, s, kvh, d).transpose(1, 2), cos, sin)  # [B, KV, S, D]
            v = v.view(b, s, kvh, d).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)  # [B, KV, T, D]
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            # grouped-query attention without repeating K/V: [B, KV, G*S, D] queries
            qg = q.reshape(b, kvh, g * s, d)
            scores = (qg @ k.transpose(-1, -2)) * d**-0.5  # [B, KV, G*S, T]
            scores = scores.view(b, kvh, g, s, p + s) + bias
            probs = torch.softmax(scores, dim=-1).view(b, kvh, g * s, p + s)
            att = (probs @ v).view(b, kvh * g, s, d).transpose(1, 2).reshape(b, s, self.q_size)
            o = att @ layer.o
            if layer.o_bias is not None:
                o = o + layer.o_bias
            x = x + o
            h = self._rms(x, layer.post_norm)
            gate, up = (h @ layer.gate_up).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ layer.down
        last = self._rms(x[:, -1], self.norm)  # [B, H]
        return (last @ self.lm_head, *presents)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]
