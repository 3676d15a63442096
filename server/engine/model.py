"""A Llama-style decoder written for serving: packed tokens, a slot KV cache, adapter hooks.

The model has no generation logic. `forward` takes one step's packed tokens (rows in
prefill and rows in decode mixed, sorted by adapter slot) and returns logits for the
positions that need a next token. Adapters are applied by an `AdapterHooks` object that
the engine passes in; the model only says where ("qkv", "o", "gate_up", "down").
Weights come from a Hugging Face directory of one of the families of
server.engine.loading (Llama, SmolLM, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 3 text);
what differs between them is a named switch of ModelSpec read from the config (sliding
windows per layer among them), and anything not computed exactly as transformers does is
refused at load (server.engine.loading). q/k/v and gate/up are fused into one matmul
each. The KV cache keeps every position; a sliding window only bounds
which keys attention reads.
How the matmuls and decode steps run is one `ModelOps` object (server.engine.ops) chosen
once by the engine and handed over with `use_ops` (PyTorch's ops until then): its
`linear`/`logits` take few-row projections and the output head through the C kernels
where it has them, and with its `fused_decode` (the CPU in fp32) steps of decode tokens
only run the work between the matmuls in server.native's decode kernels
(`_forward_decode`); PyTorch's ops are the general path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.ops import TORCH_OPS, ModelOps, Projection
from server.engine.quant import QuantizedProjection, pack_weight

if TYPE_CHECKING:
    from server.native import DecodeOps

# the config's activation name -> the gated MLP's activation, as transformers' ACT2FN has it
ACTIVATIONS = {"silu": F.silu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q_proj, k_proj, v_proj
    o_bias: bool  # bias on o_proj
    mlp_bias: bool  # bias on gate_proj, up_proj, down_proj
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    activation: str = "silu"  # of the gated MLP, a key of ACTIVATIONS
    # Gemma 3: every RMSNorm scales by (1 + weight) in fp32; the attention and MLP outputs
    # are normalized before their residual adds (4 norms a layer); embeddings scaled by
    # sqrt(hidden) (in the embedding dtype)
    gemma: bool = False
    attn_scalar: float = 0.0  # attention scores scaled by attn_scalar**-0.5 (0: head_dim)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) when > 0
    # per layer: which RoPE table it uses, 0 the global one, 1 the local one (Gemma 3's
    # sliding layers, rope_local_base_freq); () when there is one table
    rope_tables: tuple[int, ...] = ()
    # per layer: its sliding window W (a query at position p sees keys p-W+1..p, as
    # transformers' sliding_window_overlay), 0 for full attention; () when no layer has one
    windows: tuple[int, ...] = ()
    # "longrope" (Phi-3): its original_max_position_embeddings M, else 0. transformers
    # computes each forward with the long factors when its largest position is >= M,
    # else the short ones: a prefill of more than M tokens takes the long ones at every
    # position, a decode token at position p the long ones iff p >= M (StepInputs.rope_long)
    rope_long_from: int = 0

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    def rope_table(self, layer: int) -> int:
        return self.rope_tables[layer] if self.rope_tables else 0

    @property
    def attn_scale(self) -> float:
        return (self.attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class AdapterHooks(Protocol):
    """Adds per-row adapter effects; the engine implements it for the current step."""

    def pre(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """The input of a projection, changed for the rows that need it ("o", "down")."""

    def linear(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Apply the rows' adapters to a projection's output (in place)."""


@dataclass
class StepInputs:
    """One step's packed tokens. T = tokens in the step; tokens of a row are contiguous.

    input_ids [T]; positions [T]; rows [T] (KV-cache row of each token);
    decode_tok [Bd] indices of single-token (decode) entries, decode_rows [Bd] their rows;
    prefill: (tok_start, tok_end, row, pos_start) per multi-token chunk;
    kv_len_max: longest cache length after this step among decode rows;
    sample_idx [R] token indices whose logits are returned.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    decode_tok: torch.Tensor
    decode_rows: torch.Tensor
    decode_lens: torch.Tensor
    prefill: list[tuple[int, int, int, int]]
    sample_idx: torch.Tensor
    decode_n_rows: int = 0  # max(decode_rows) + 1
    decode_kv_len: int = 0  # max(decode_lens)
    # (token indices [k], embeddings [k, hidden]) used instead of the embedding table
    # (virtual tokens of prompt-tuning adapters)
    embed_override: tuple[torch.Tensor, torch.Tensor] | None = None
    # longrope: indices of prefill tokens whose sequence's prompt is longer than
    # ModelSpec.rope_long_from (their RoPE takes the long factors at every position)
    rope_long: torch.Tensor | None = None


class KVCache:
    """Per-row KV cache allocated once: k[layer], v[layer] of [rows, kv_heads, max_len, dim]."""

    def __init__(self, spec: ModelSpec, rows: int, max_len: int, dtype, device) -> None:
        shape = (rows, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.rows = rows
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_prefix(self, row: int, keys, values) -> None:
        """Positions [0, n) of `row` from keys[layer], values[layer] ([kv_heads, n, dim]
        each; a list per layer or one [layers, kv_heads, n, dim] tensor)."""
        n = keys[0].shape[-2]
        for layer, (kc, vc) in enumerate(zip(self.k, self.v, strict=True)):
            kc[row, :, :n] = keys[layer]
            vc[row, :, :n] = values[layer]

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elem


class RMSNorm(nn.Module):
    """Llama's RMSNorm; with `upcast` Gemma's, whose weight (loaded as 1 + HF's weight, and
    kept in fp32) multiplies in fp32 before the cast back to x's dtype."""

    def __init__(self, size: int, eps: float, upcast: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or self.upcast:  # one fused kernel; as below in fp32
            return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h = spec.hidden_size

        def norm(size: int) -> RMSNorm:
            return RMSNorm(size, spec.rms_norm_eps, upcast=spec.gemma)

        self.input_norm = norm(h)
        self.qkv = Projection(h, spec.q_size + 2 * spec.kv_size, spec.qkv_bias)
        # per-head norms of the queries and keys (spec.qk_norm), or None
        self.q_norm = norm(spec.head_dim) if spec.qk_norm else None
        self.k_norm = norm(spec.head_dim) if spec.qk_norm else None
        self.o = Projection(spec.q_size, h, spec.o_bias)
        # spec.gemma: norms of the attention output and of the MLP output, or None
        self.attn_out_norm = norm(h) if spec.gemma else None
        self.post_norm = norm(h)  # the MLP's input norm
        self.gate_up = Projection(h, 2 * spec.intermediate_size, spec.mlp_bias)
        self.down = Projection(spec.intermediate_size, h, spec.mlp_bias)
        self.mlp_out_norm = norm(h) if spec.gemma else None


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, ropes: list[tuple[torch.Tensor, float]],
                 long_inv_freq: torch.Tensor | None = None) -> None:
        """ropes: (inv_freq, attention scaling) of each RoPE table (spec.rope_tables);
        long_inv_freq: longrope's long factors' (spec.rope_long_from), ropes[0] the short."""
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        # spec.gemma: sqrt(hidden) as HF's Gemma3TextScaledWordEmbedding has it (fp32, then
        # the model's dtype: model.to casts it), or None
        self.register_buffer("embed_scale", torch.tensor(spec.hidden_size**0.5)
                             if spec.gemma else None, persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, upcast=spec.gemma)
        # [vocab, hidden]; logits are computed as W @ x^T, the fastest layout for it.
        self.lm_head = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size))
        # --quantize int8/int4 on the CPU: the output projection in int8
        # (server.engine.quant.QuantizedProjection), lm_head then holding its dequantized
        # weight; or None
        self.lm_head_q: nn.Module | None = None
        # --prepack-weights: oneDNN's copy of a plain lm_head (`prepack`), or None
        self.lm_head_packed: torch.Tensor | None = None
        self.inv_freqs = [inv_freq.float() for inv_freq, _ in ropes]  # kept fp32 on the CPU
        self.rope_scalings = [scaling for _, scaling in ropes]
        self.long_inv_freq = None if long_inv_freq is None else long_inv_freq.float()
        self.rope_len = 0  # positions per table (rows of a table: 2x that with longrope)
        self.cos: list[torch.Tensor] = []  # per RoPE table, made by build_rope
        self.sin_rot: list[torch.Tensor] = []
        # how the matmuls and decode steps run (server.engine.ops): `use_ops`
        self.ops: ModelOps = TORCH_OPS
        self._decode_cache: tuple | None = None  # (key, _decode_layers' list)

    def use_ops(self, ops: ModelOps) -> None:
        """Run with `ops` (server.engine.ops.ModelOps.pick) from the next step on."""
        self.ops = ops

    def plain_weight_bytes(self) -> int:
        """The bytes of the plain Projections' weights and of a plain head (what `prepack`
        copies of them)."""
        head = 0 if self.lm_head_q is not None else (
            self.lm_head.numel() * self.lm_head.element_size())
        return head + sum(m.weight.numel() * m.weight.element_size() for m in self.modules()
                          if type(m) is Projection)

    def prepack(self) -> int:
        """--prepack-weights: each plain Projection (fp32 or bf16) and each bf16-weight
        QuantizedProjection on the CPU keeps oneDNN's copy of its weight
        (server.engine.ops.Projection.prepack, quant.QuantizedProjection.prepack); int8 and
        int4 keep their own layouts; and a plain (fp32 or bf16) output head: a 32-row step's
        default-model head 9.8 ms instead of 18.6 (fp32, Zen 5, 2 threads). Returns how many
        projections were packed."""
        projections = [m for m in self.modules()
                       if isinstance(m, (Projection, QuantizedProjection))]
        for proj in projections:
            proj.prepack()
        if self.lm_head_q is None:
            self.lm_head_packed = pack_weight(self.lm_head.detach())
        return sum(proj.packed_nbytes > 0 for proj in projections)

    @property
    def packed_nbytes(self) -> int:
        """The bytes of every pre-packed copy (`prepack`): projections and head."""
        head = self.lm_head_packed
        return sum(getattr(m, "packed_nbytes", 0) for m in self.modules() if m is not self) + (
            0 if head is None else head.numel() * head.element_size())

    def norm_qk(self, layer: DecoderLayer, qkv: torch.Tensor) -> None:
        """spec.qk_norm: the per-head RMSNorm of the queries and keys inside qkv [T, width]
        (after the adapters, before RoPE, as in HF's Qwen3Attention), in place. PyTorch's
        op on both paths: the native decode kernel has no such step."""
        spec = self.spec
        q = qkv[:, : spec.q_size].view(-1, spec.num_heads, spec.head_dim)
        k = qkv[:, spec.q_size : spec.q_size + spec.kv_size].view(-1, spec.num_kv_heads,
                                                                  spec.head_dim)
        q.copy_(layer.q_norm.forward(q))
        k.copy_(layer.k_norm.forward(k))

    def build_rope(self, max_len: int) -> None:
        """cos/sin tables [max_len, head_dim] of each RoPE table, computed as HF does (fp32,
        then cast); the sin table's first half negated for `_rope`. With longrope the table
        has 2 * max_len rows: position p's of a decode step (short factors below
        spec.rope_long_from, long from there), then the long factors' at every position
        (prefill of a sequence longer than rope_long_from: StepInputs.rope_long)."""
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        self.cos, self.sin_rot = [], []
        self.rope_len = max_len
        for inv_freq, scaling in zip(self.inv_freqs, self.rope_scalings, strict=True):
            pos = torch.arange(max_len, device=device, dtype=torch.float32)
            inv = inv_freq.to(device)[None, :].expand(max_len, -1)
            if self.long_inv_freq is not None:
                long = self.long_inv_freq.to(device)[None, :].expand(max_len, -1)
                decode = torch.where(pos[:, None] >= self.spec.rope_long_from, long, inv)
                inv, pos = torch.cat((decode, long)), torch.cat((pos, pos))
            freqs = pos[:, None] * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos.append((emb.cos() * scaling).to(dtype))
            sin = (emb.sin() * scaling).to(dtype)
            half = sin.shape[-1] // 2
            self.sin_rot.append(torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))

    def native_fallbacks(self) -> list[str]:
        """What steps of decode tokens run with PyTorch ops when the native kernels run the
        rest (they have no such step)."""
        spec = self.spec
        return (["the per-head q/k RMSNorm (q_norm, k_norm)"] if spec.qk_norm else []) + (
            [f"the {spec.activation} activation"] if spec.activation != "silu" else [])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, hidden] after the final norm -> [R, vocab]."""
        if self.lm_head_q is not None:
            logits = self.lm_head_q.forward(x)
        else:
            logits = self.ops.logits(self.lm_head, x, self.lm_head_packed)
        cap = self.spec.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def _mlp_act(self, gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.chunk(2, dim=-1)
        return ACTIVATIONS[self.spec.activation](gate) * up

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv: KVCache, hooks: AdapterHooks | None) -> torch.Tensor:
        spec = self.spec
        x = self.embed(step.input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if step.embed_override is not None:
            x[step.embed_override[0]] = step.embed_override[1]
        ops = self.ops
        if ops.fused_decode and not step.prefill and step.rope_long is None:
            return self._forward_decode(x, step, kv, hooks)  # decode tokens only
        rope_pos = step.positions
        if step.rope_long is not None:  # longrope: the long table's rows for these tokens
            rope_pos = rope_pos.clone()
            rope_pos[step.rope_long] += self.rope_len
        cos = [c[rope_pos].unsqueeze(1) for c in self.cos]  # per table [T, 1, D]
        sin = [s[rope_pos].unsqueeze(1) for s in self.sin_rot]
        # decode rows, per window: [rows, 1, 1, L] True past each row's length (and, with a
        # window W, before its last W positions), made once for the layers that share it
        pads: dict[int, torch.Tensor] = {}
        lens = None
        if step.decode_tok.shape[0] > 1:
            lens = torch.ones(step.decode_n_rows, dtype=torch.long, device=x.device)
            lens[step.decode_rows] = step.decode_lens
            ar = torch.arange(step.decode_kv_len, device=x.device)[None, :]
        heads = spec.num_heads + spec.num_kv_heads
        # Where each token's keys and values go in a cache layer seen as [rows*KV*L, D]
        kv_heads = torch.arange(spec.num_kv_heads, device=x.device)
        cache_idx = ((step.rows[:, None] * spec.num_kv_heads + kv_heads) * kv.max_len
                     + step.positions[:, None]).view(-1)
        for i, layer in enumerate(self.layers):
            h = layer.input_norm.forward(x)  # .forward: no Module.__call__ overhead
            qkv = ops.linear(layer.qkv, h)
            if hooks is not None:
                hooks.linear(i, "qkv", h, qkv)
            if spec.qk_norm:
                self.norm_qk(layer, qkv)
            t = spec.rope_table(i)
            qk = _rope(qkv[:, : spec.q_size + spec.kv_size].view(-1, heads, spec.head_dim),
                       cos[t], sin[t])
            q, k = qk.split([spec.num_heads, spec.num_kv_heads], dim=1)
            v = qkv[:, spec.q_size + spec.kv_size :]
            kc, vc = kv.k[i], kv.v[i]
            kc.view(-1, spec.head_dim).index_copy_(0, cache_idx, k.reshape(-1, spec.head_dim))
            vc.view(-1, spec.head_dim).index_copy_(0, cache_idx, v.reshape(-1, spec.head_dim))
            window, pad = spec.window(i), None
            if lens is not None:
                pad = pads.get(window)
                if pad is None:
                    pad = ar >= lens[:, None]
                    if window:
                        pad |= ar < (lens - window)[:, None]
                    pad = pads[window] = pad[:, None, None, :]
            attn = self._attention(q, kc, vc, step, pad, window)
            if hooks is not None:
                attn = hooks.pre(i, "o", attn)
            o = ops.linear(layer.o, attn)
            if hooks is not None:
                hooks.linear(i, "o", attn, o)
            x += o if layer.attn_out_norm is None else layer.attn_out_norm.forward(o)
            h = layer.post_norm.forward(x)
            gu = ops.linear(layer.gate_up, h)
            if hooks is not None:
                hooks.linear(i, "gate_up", h, gu)
            act = self._mlp_act(gu)
            if hooks is not None:
                act = hooks.pre(i, "down", act)
            down = ops.linear(layer.down, act)
            if hooks is not None:
                hooks.linear(i, "down", act, down)
            x += down if layer.mlp_out_norm is None else layer.mlp_out_norm.forward(down)
        return self._logits(self.norm(x[step.sample_idx]))

    def _decode_layers(self, kv: KVCache) -> tuple[DecodeOps, list[tuple]]:
        """The checked decode kernels for this model (ModelOps.decode_ops) and, per
        layer, what `_forward_decode` passes to them and never changes between steps:
        (layer, its norms' weight pointers (input, attention output or 0, MLP input, MLP
        output or 0, the next layer's input or the final norm), its cache layers' and RoPE
        tables' pointers, window), each operand checked once here. Built once per KV cache:
        the Module attribute lookups and pointer reads were a third of a step's time outside
        the matmuls (benchmarks/profile_decode.py)."""
        key = (id(kv), kv.k[0].data_ptr(), self.norm.weight.data_ptr(), self.cos[0].data_ptr(),
               self.ops)  # the object: compared by identity, kept alive
        if self._decode_cache is not None and self._decode_cache[0] == key:
            return self._decode_cache[1]
        spec, layers = self.spec, []
        ops = self.ops.decode_ops(spec.hidden_size, spec.intermediate_size, spec.num_heads,
                                  spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps,
                                  spec.attn_scale)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            t = spec.rope_table(i)
            layers.append((
                layer, ops.weight(layer.input_norm.weight),
                ops.weight(None if layer.attn_out_norm is None else layer.attn_out_norm.weight),
                ops.weight(layer.post_norm.weight),
                ops.weight(None if layer.mlp_out_norm is None else layer.mlp_out_norm.weight),
                ops.weight(nxt.weight), ops.layer(kv.k[i], kv.v[i], self.cos[t], self.sin_rot[t]),
                spec.window(i)))
        self._decode_cache = (key, (ops, layers))
        return ops, layers

    def _forward_decode(self, x: torch.Tensor, step: StepInputs, kv: KVCache,
                        hooks: AdapterHooks | None) -> torch.Tensor:
        """`forward` for a step of decode tokens only (one a row), with the native kernels
        between the matmuls (server.native.DecodeOps, which checks their operands): about 8
        calls a layer instead of about 28 ops, and attention over each row's own length.
        Each residual add is fused with the next norm."""
        spec = self.spec
        n = x.shape[0]
        threads = 1 if n == 1 else torch.get_num_threads()
        pos, rows = step.positions.contiguous(), step.rows.contiguous()
        x = x.contiguous()
        h = torch.empty_like(x)
        act = x.new_empty(n, spec.intermediate_size)
        attn = x.new_empty(n, spec.q_size)
        silu, qk_norm = spec.activation == "silu", spec.qk_norm
        linear = self.ops.linear
        decode, plan = self._decode_layers(kv)
        run = decode.step(x, h, act, attn, pos, rows, threads)
        run.norm_input(plan[0][1])
        for i, (layer, _, attn_out_w, post_w, mlp_out_w, next_w, cache, window) in \
                enumerate(plan):
            qkv = linear(layer.qkv, h).contiguous()
            if hooks is not None:
                hooks.linear(i, "qkv", h, qkv)
            if qk_norm:
                self.norm_qk(layer, qkv)
            run.attention(qkv, cache, window)
            a = hooks.pre(i, "o", attn) if hooks is not None else attn
            o = linear(layer.o, a).contiguous()
            if hooks is not None:
                hooks.linear(i, "o", a, o)
            if attn_out_w:
                run.norm(o, attn_out_w)
            run.add_norm(o, post_w)
            gu = linear(layer.gate_up, h).contiguous()
            if hooks is not None:
                hooks.linear(i, "gate_up", h, gu)
            if silu:
                run.silu_mul(gu)
            else:
                act.copy_(self._mlp_act(gu))
            a = hooks.pre(i, "down", act) if hooks is not None else act
            down = linear(layer.down, a).contiguous()
            if hooks is not None:
                hooks.linear(i, "down", a, down)
            if mlp_out_w:
                run.norm(down, mlp_out_w)
            run.add_norm(down, next_w)
        return self._logits(h[step.sample_idx])

    def _attention(self, q, kc, vc, step: StepInputs, pad, window: int) -> torch.Tensor:
        """q [T, H, D] -> [T, H*D]; keys/values read from the cache rows (no copies). With a
        sliding window W a query at position p reads keys max(0, p-W+1)..p only."""
        spec = self.spec
        n_tok = q.shape[0]
        out = q.new_empty(n_tok, spec.num_heads, spec.head_dim)
        groups = spec.num_heads // spec.num_kv_heads
        scale = spec.attn_scale
        if step.decode_tok.shape[0] == 1:
            # One decode row: one kernel over its cache prefix (no padding to mask).
            row, kv_len = step.decode_n_rows - 1, step.decode_kv_len
            first = max(0, kv_len - window) if window else 0
            od = F.scaled_dot_product_attention(
                q.index_select(0, step.decode_tok).unsqueeze(2),
                kc[row : row + 1, :, first:kv_len], vc[row : row + 1, :, first:kv_len],
                scale=scale, enable_gqa=True)  # [1, H, 1, D]
            if n_tok == 1:
                return od.view(1, spec.num_heads * spec.head_dim)
            out[step.decode_tok] = od.view(1, spec.num_heads, spec.head_dim)
        elif step.decode_n_rows:
            # Decode rows: one batched attention over the cache rows [0, n_rows) in place.
            n_rows, kv_len = step.decode_n_rows, step.decode_kv_len
            qd = q.new_zeros(n_rows, spec.num_heads, spec.head_dim)
            qd[step.decode_rows] = q[step.decode_tok]
            qd = qd.view(n_rows, spec.num_kv_heads, groups, spec.head_dim)
            keys = kc[:n_rows, :, :kv_len]  # [n, KV, L, D] view
            vals = vc[:n_rows, :, :kv_len]
            scores = torch.matmul(qd * scale, keys.transpose(-1, -2))  # [n, KV, G, L]
            scores.masked_fill_(pad, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            od = torch.matmul(probs, vals).view(n_rows, spec.num_heads, spec.head_dim)
            out[step.decode_tok] = od[step.decode_rows]
        for start, end, row, pos0 in step.prefill:
            n = end - start
            total = pos0 + n
            first = max(0, pos0 + 1 - window) if window else 0  # the first key any query sees
            qp = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            keys = kc[row : row + 1, :, first:total]
            vals = vc[row : row + 1, :, first:total]
            mask = None
            if pos0 > 0 or window:  # query i (at pos0 + i) sees keys in (pos0 + i - W, pos0 + i]
                mask = torch.ones(n, total - first, dtype=torch.bool, device=q.device)
                mask = mask.tril(pos0 - first)
                if window:
                    mask = mask.triu(pos0 - first - window + 1)
            o = F.scaled_dot_product_attention(
                qp, keys, vals, attn_mask=mask, is_causal=mask is None, scale=scale,
                enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        return out.view(n_tok, spec.num_heads * spec.head_dim)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` in fewer ops, with the same result bit for bit:
    rotate_half(x) = cat(-x2, x1) and roll(x) = cat(x2, x1), so rotate_half(x) * sin =
    roll(x) * sin_rot, where sin_rot is sin with its first half negated."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_rot
