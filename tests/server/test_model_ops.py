"""The decoder's own ops against their references: RoPE bit for bit against HF's
rotate_half form, and a decode row's logits the same whether it runs alone (the one-row
attention kernel) or among other rows of different lengths (the padded batched path)."""

from __future__ import annotations

import pytest
import torch
from support import KERNEL_BUILDS, kernels_for, make_tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.config import EngineConfig
from server.engine.engine import Engine, prepack_auto
from server.engine.loading import load_model
from server.engine.model import KVCache, StepInputs, _rope
from server.engine.ops import TORCH_OPS, ModelOps


def test_rope_is_bit_identical_to_hf():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=g)  # [T, heads, D]
    k = torch.randn(5, 2, 16, generator=g)
    cos, sin = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)  # [T, D]
    sin_rot = torch.cat((-sin[:, :8], sin[:, 8:]), dim=-1)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    assert torch.equal(_rope(q, cos[:, None], sin_rot[:, None]), hf_q)
    assert torch.equal(_rope(k, cos[:, None], sin_rot[:, None]), hf_k)


def _long(values):
    return torch.tensor(values, dtype=torch.long)


def _prefill(model, kv, row, ids):
    n = len(ids)
    model(StepInputs(input_ids=_long(ids), positions=_long(range(n)), rows=_long([row] * n),
                     decode_tok=_long([]), decode_rows=_long([]), decode_lens=_long([]),
                     prefill=[(0, n, row, 0)], sample_idx=_long([n - 1])), kv, None)


def _decode(model, kv, rows, lens, token=7):
    """One decode token per row; row r's cache holds lens[r] - 1 positions already."""
    n = len(rows)
    return model(StepInputs(
        input_ids=_long([token] * n), positions=_long([length - 1 for length in lens]),
        rows=_long(rows), decode_tok=_long(range(n)), decode_rows=_long(rows),
        decode_lens=_long(lens), prefill=[], sample_idx=_long(range(n)),
        decode_n_rows=max(rows) + 1, decode_kv_len=max(lens)), kv, None)


@pytest.fixture(scope="module")
def window_model(tmp_path_factory):
    """Mistral with a sliding window of 8 on every layer: shorter than the longest rows."""
    return make_tiny_model(tmp_path_factory.mktemp("window-model"), model_type="mistral",
                           sliding_window=8)


@pytest.fixture(params=["llama", "mistral-window-8"])
def any_model(request, tiny_model, window_model):
    return tiny_model if request.param == "llama" else window_model


def test_one_decode_row_matches_the_batched_path(any_model):
    model = load_model(any_model, torch.float32, torch.device("cpu"))
    model.build_rope(64)
    kv = KVCache(model.spec, rows=3, max_len=64, dtype=torch.float32, device="cpu")
    prompts = {0: [3, 9, 4, 1, 5], 1: [2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], 2: [8, 4, 6]}
    for row, ids in prompts.items():
        _prefill(model, kv, row, ids)
    lens = {row: len(ids) + 1 for row, ids in prompts.items()}
    together = _decode(model, kv, [0, 1, 2], [lens[0], lens[1], lens[2]])
    for i, row in enumerate([0, 1, 2]):  # the same token at the same position, alone
        alone = _decode(model, kv, [row], [lens[row]])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
        assert int(alone[0].argmax()) == int(together[i].argmax())


@pytest.mark.parametrize("march", KERNEL_BUILDS)
def test_native_decode_steps_match_the_pytorch_ops(any_model, march):
    """Steps of decode tokens through the C kernels (server.native) against the same steps
    through PyTorch's ops: logits, and the keys and values written into the cache, for one
    row alone and for three rows of different lengths together (PyTorch pads them to the
    longest and masks; the kernel reads each row's own length, or its last W positions
    under a sliding window W). Every build of the kernels (AVX-512, AVX2, plain C)."""
    model = load_model(any_model, torch.float32, torch.device("cpu"))
    model.build_rope(64)
    prompts = {0: [3, 9, 4, 1, 5, 2, 6], 1: [8, 4, 6], 2: [5] * 20}
    caches, logits = {}, {}
    for kernels in (None, kernels_for(march)):
        model.use_ops(TORCH_OPS if kernels is None else ModelOps(kernels, fused_decode=True))
        kv = KVCache(model.spec, rows=3, max_len=64, dtype=torch.float32, device="cpu")
        for row, ids in prompts.items():
            _prefill(model, kv, row, ids)
        lens = {row: len(ids) + 1 for row, ids in prompts.items()}
        steps = []
        for i in range(4):
            steps.append(_decode(model, kv, [1], [lens[1]], token=10 + i))  # alone
            lens[1] += 1
            steps.append(_decode(model, kv, [0, 1, 2], [lens[0], lens[1], lens[2]],
                                 token=20 + i))
            lens = {row: length + 1 for row, length in lens.items()}
        logits[kernels is None] = torch.cat(steps)
        caches[kernels is None] = kv
    torch.testing.assert_close(logits[False], logits[True], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[False].argmax(-1), logits[True].argmax(-1))
    for a, b in zip(caches[True].k + caches[True].v, caches[False].k + caches[False].v,
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert caches[False].k[0][1, :, 3 + 8 :].abs().max() == 0  # nothing past the last position


def test_decode_ops_refuse_operands_the_kernels_cannot_take():
    """server.native.DecodeOps checks what it hands the C kernels as raw pointers: a
    tensor of the wrong dtype, shape or layout, or on another device, is a ValueError
    naming the operand, and nothing is written."""
    from server import native

    ops = native.DecodeOps(kernels_for("native"), 64, 96, 4, 2, 16, 1e-6, 0.25)
    weight, cache, v_cache = torch.ones(64), torch.zeros(3, 2, 8, 16), torch.zeros(3, 2, 8, 16)
    cos, sin_rot = torch.ones(8, 16), torch.zeros(8, 16)  # kept alive: ops keep pointers
    w = ops.weight(weight)
    layer = ops.layer(cache, v_cache, cos, sin_rot)
    for bad in (torch.ones(32), torch.ones(64, dtype=torch.float64), torch.ones(128)[::2]):
        with pytest.raises(ValueError, match="norm weight"):
            ops.weight(bad)
    with pytest.raises(ValueError, match="cache layer"):
        ops.layer(torch.zeros(3, 2, 8, 8), cache, torch.ones(8, 16), torch.ones(8, 16))
    with pytest.raises(ValueError, match="cos"):  # shorter than the cache
        ops.layer(cache, cache, torch.ones(4, 16), torch.ones(8, 16))
    with pytest.raises(ValueError, match="v cache"):
        ops.layer(cache, cache.transpose(0, 1).contiguous().transpose(0, 1), torch.ones(8, 16),
                  torch.ones(8, 16))

    def buffers(n=2):
        return (torch.randn(n, 64), torch.zeros(n, 64), torch.zeros(n, 96),
                torch.zeros(n, 64), torch.tensor([0, 1][:n]), torch.tensor([0, 2][:n]))

    with pytest.raises(ValueError, match="positions"):
        x, h, act, attn, pos, rows = buffers()
        ops.step(x, h, act, attn, pos.int(), rows, 1)
    with pytest.raises(ValueError, match="act"):
        x, h, act, attn, pos, rows = buffers()
        ops.step(x, h, act[:1], attn, pos, rows, 1)
    x, h, act, attn, pos, rows = buffers()
    run = ops.step(x, h, act, attn, pos, rows, 1)
    x0 = x.clone()
    for bad in (torch.randn(2, 64, dtype=torch.float64), torch.randn(3, 64),
                torch.randn(64, 2).T):
        with pytest.raises(ValueError, match="residual"):
            run.add_norm(bad, w)
        with pytest.raises(ValueError, match="norm input"):
            run.norm(bad, w)
    with pytest.raises(ValueError, match="gate_up"):
        run.silu_mul(torch.randn(2, 96))
    with pytest.raises(ValueError, match="qkv"):
        run.attention(torch.randn(2, 64), layer, 0)
    assert torch.equal(x, x0) and not h.any() and not act.any() and not cache.any()
    assert not v_cache.any()
    # and operands that fit go through: x += d, h = rms_norm(x) (weights of one)
    d = torch.randn(2, 64)
    run.add_norm(d, w)
    torch.testing.assert_close(x, x0 + d)
    torch.testing.assert_close(h, torch.nn.functional.rms_norm(x, (64,), eps=1e-6))
    run.attention(torch.randn(2, 128), layer, 0)
    for c in (cache, v_cache):  # token 0 at position 0 of row 0, token 1 at 1 of row 2
        assert c[0, :, 0].any() and c[2, :, 1].any() and not c[1].any()


def test_the_ops_are_chosen_once_by_mode_device_and_dtype():
    """server.engine.ops.ModelOps.pick: the fp32 CPU gets the fused decode and the few-row
    kernel, a bf16 CPU with auto the few-row kernel only, torch mode, float16 and CUDA
    PyTorch's ops only (CUDA's choice is made without a GPU: no kernel is built for it)."""
    from server import native

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kernels = native.kernels()
    for mode in ("auto", "native"):
        ops = ModelOps.pick(mode, cpu, torch.float32)
        assert ops.fused_decode and ops.kernels is kernels
    ops = ModelOps.pick("auto", cpu, torch.bfloat16)
    assert ops.kernels is kernels and not ops.fused_decode
    for mode, device, dtype in (("torch", cpu, torch.float32), ("torch", cpu, torch.bfloat16),
                                ("auto", cpu, torch.float16), ("auto", cuda, torch.float32),
                                ("auto", cuda, torch.bfloat16)):
        ops = ModelOps.pick(mode, device, dtype)
        assert ops.kernels is None and not ops.fused_decode, (mode, device, dtype)
    assert TORCH_OPS.kernels is None and not TORCH_OPS.fused_decode
    with pytest.raises(ValueError, match="fused decode"):
        ModelOps(None, fused_decode=True)
    with pytest.raises(ValueError, match="fused decode"):
        ModelOps(kernels).decode_ops(64, 96, 4, 2, 16, 1e-6, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_of_a_plain_projection_take_the_kernel_and_the_rest_their_forward(dtype):
    """ModelOps.linear and .logits: fewer than FEW_ROWS rows of a plain Projection (and of
    the output head) through native_linear when the ops have the kernels, FEW_ROWS rows and
    anything not a plain Projection (a quantized one) through its own forward; PyTorch's
    ops always through the forward."""
    from server.engine.ops import FEW_ROWS, Projection, native_linear
    from server.engine.quant import QuantizedProjection

    ops = ModelOps.pick("auto", torch.device("cpu"), dtype)
    assert ops.kernels is not None
    g = torch.Generator().manual_seed(0)
    proj = Projection(64, 48, bias=True).requires_grad_(False)
    proj.load(torch.randn(48, 64, generator=g), torch.randn(48, generator=g))
    proj = proj.to(dtype)
    head = torch.randn(100, 64, generator=g).to(dtype)
    quantized = QuantizedProjection(torch.randn(48, 64, generator=g), None, "int8",
                                    ops.kernels)
    for rows in (1, 3, FEW_ROWS - 1, FEW_ROWS):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        few = rows < FEW_ROWS
        want = (native_linear(ops.kernels, x, proj.weight, proj.bias) if few
                else proj.forward(x))
        assert torch.equal(ops.linear(proj, x), want)
        assert torch.equal(TORCH_OPS.linear(proj, x), proj.forward(x))
        want = native_linear(ops.kernels, x, head, None) if few else torch.mm(head, x.T).T
        assert torch.equal(ops.logits(head, x), want)
        assert torch.equal(TORCH_OPS.logits(head, x), torch.mm(head, x.T).T)
        x32 = x.float()
        assert torch.equal(ops.linear(quantized, x32), quantized.forward(x32))
    with pytest.raises(ValueError, match="native_linear"):  # its operand checks stay
        ops.linear(proj, torch.randn(2, 64, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_projections_take_the_packed_copy_from_packed_rows(dtype):
    """--prepack-weights: a plain Projection keeps oneDNN's copy of its weight; from
    PACKED_ROWS rows ModelOps.linear multiplies with it (the same product as the plain
    weight's up to fp32 rounding, bf16's bit for bit), below it the C kernel as before; the
    copy is counted, and a model packs its plain projections only."""
    from server.engine.ops import PACKED_ROWS, Projection, native_linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    ops = ModelOps.pick("auto", torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(1)
    proj = Projection(96, 40, bias=True).requires_grad_(False)
    proj.load(torch.randn(40, 96, generator=g), torch.randn(40, generator=g))
    proj = proj.to(dtype)
    proj.prepack()
    assert proj.packed_nbytes == proj.weight.numel() * proj.weight.element_size()
    for rows in (1, PACKED_ROWS - 1, PACKED_ROWS, 33, 200):
        x = torch.randn(rows, 96, generator=g).to(dtype)
        got, plain = ops.linear(proj, x), torch.nn.functional.linear(x, proj.weight, proj.bias)
        if rows < PACKED_ROWS:
            assert torch.equal(got, native_linear(ops.kernels, x, proj.weight, proj.bias))
        elif dtype == torch.bfloat16 and proj.bias is None:
            assert torch.equal(got, plain)
        else:
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            torch.testing.assert_close(got.float(), plain.float(), rtol=tol,
                                       atol=tol * float(plain.abs().max()))


def test_prepack_packs_every_plain_projection_of_a_model(tmp_path):
    """DecoderModel.prepack (--prepack-weights) packs the four projections of every layer,
    and a 12-row projection through the copy agrees with the one before within fp32
    rounding (the served tokens: benchmarks/results/prepack-check.json)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    model_dir = make_tiny_model(tmp_path / "m")
    model = load_model(model_dir, torch.float32, torch.device("cpu"), "none")
    model.use_ops(ModelOps.pick("auto", torch.device("cpu"), torch.float32))
    model.build_rope(64)
    x = torch.randn(12, model.spec.hidden_size)
    layer = model.layers[0]
    before = model.ops.linear(layer.gate_up, x), model._logits(x)
    assert model.prepack() == 4 * len(model.layers)
    assert model.lm_head_packed is not None  # and the head
    after = model.ops.linear(layer.gate_up, x), model._logits(x)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("device", "dtype", "quantize", "copy", "left", "expected"), [
    (CPU, torch.float32, "none", 1 << 30, 4 << 30, True),  # a quarter of what is left
    (CPU, torch.float32, "none", (1 << 30) + 1, 4 << 30, False),
    (CPU, torch.float32, "none", 1 << 20, None, False),  # memory left unknown
    (CPU, torch.float32, "bf16", 8 << 30, 1 << 30, True),  # bf16 weights: always
    (CPU, torch.float32, "int8", 0, 4 << 30, False),  # their own layout
    (CPU, torch.float32, "w8a8", 0, 4 << 30, False),
    (CPU, torch.bfloat16, "none", 1 << 20, 4 << 30, False),  # --dtype bfloat16: asked only
    (CUDA, torch.float32, "none", 1 << 20, 4 << 30, False),
])
def test_prepack_auto(device, dtype, quantize, copy, left, expected):
    assert prepack_auto(device, dtype, quantize, copy, left) == expected


def test_an_fp32_engine_prepacks_by_default_when_memory_allows(tmp_path):
    """--prepack-weights auto on this machine (a tiny model's copy is far under a quarter
    of any memory left here); off keeps the plain weights only."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    model_dir = make_tiny_model(tmp_path / "m")
    packed = {}
    for mode in ("auto", "off"):
        engine = Engine(model_dir, tmp_path / "adapters", EngineConfig(
            dtype="float32", prepack_weights=mode, kv_cache_bytes=8 << 20, max_seq_len=64))
        packed[mode] = engine.model.packed_nbytes
        assert engine.memory()["base_model"] == packed[mode] + sum(
            t.numel() * t.element_size() for t in (*engine.model.parameters(),
                                                   *engine.model.buffers()))
    assert packed == {"auto": engine.model.plain_weight_bytes(), "off": 0}
