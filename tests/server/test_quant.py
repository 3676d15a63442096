"""Quantized projections (`--quantize int8|int4|bf16|w8a8|w4a8`, server.engine.quant): the
quantization error is bounded, the C kernels compute the matmul with the dequantized
weights (w8a8/w4a8: of the activations rounded to int8 a row) for any row count on every
build (native, AVX2, plain C), and greedy output through the server equals
PEFT/transformers run on the same dequantized weights (and rounded activations), for the
base model and a LoRA adapter, alone and in one mixed batch."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch
from support import KERNEL_BUILDS, kernels_for, make_lora

from server.engine.loading import ModelLoadError, load_model
from server.engine.ops import native_linear
from server.engine.quant import (
    ACT8_MODES,
    ACT_BLOCK,
    BF16_GEMM_ROWS,
    GEMM_ROWS,
    GROUP,
    QuantizedProjection,
    QuantizeError,
    dequantize_int4,
    dequantize_int8,
    quantize_blocks,
    quantize_int4,
    quantize_int8,
    round_activations,
)
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

NEW_TOKENS = 40
PROMPTS = [[1, 504, 2134, 28, 9043, 314, 7], list(range(200, 237)), [42, 4242, 424, 24]]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _weights(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose scales span three orders of magnitude (per-channel scales
    matter), with a few outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-3, 0, out_f)[:, None]
    w[::7, 3] *= 6.0
    return w


def test_int8_error_is_bounded_per_channel():
    w = _weights(300, 576)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (300,)
    err = (dequantize_int8(q, scale) - w).abs()
    # round to nearest: at most half a step of the row's own scale (max |w| / 127)
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5))
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    # per channel: small whatever the row's scale (a row with an outlier 6x its largest
    # Gaussian value has a 6x coarser step)
    rel = err.norm(dim=1) / w.norm(dim=1)
    plain = torch.ones(300, dtype=torch.bool)
    plain[::7] = False
    assert rel[plain].max() < 0.012, rel[plain].max()
    assert rel[~plain].max() < 0.04, rel[~plain].max()


def test_int4_error_is_bounded_per_group():
    w = _weights(96, 576)
    packed, scale, lo = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 288)
    assert scale.shape == lo.shape == (96, 576 // GROUP)
    deq = dequantize_int4(packed, scale, lo)
    err = (deq - w).abs().view(96, -1, GROUP)
    assert torch.all(err <= scale[..., None] / 2 * (1 + 1e-4) + 1e-7)
    # each group's extremes are exact grid points
    wg = w.view(96, -1, GROUP)
    torch.testing.assert_close(deq.view(96, -1, GROUP).amin(-1), wg.amin(-1))
    torch.testing.assert_close(deq.view(96, -1, GROUP).amax(-1), wg.amax(-1))
    rel = (deq - w).norm(dim=1) / w.norm(dim=1)
    assert rel.max() < 0.12, rel.max()


def test_int4_packing_order():
    """Byte i of a 32-input block holds input i (low nibble) and 16 + i (high)."""
    w = torch.arange(64, dtype=torch.float32).remainder(16).view(1, 64)  # u = k % 16
    w[0, 16:32] = 15 - w[0, 16:32]
    packed, scale, lo = quantize_int4(w, 32)
    assert torch.equal(scale, torch.ones(1, 2)) and torch.equal(lo, torch.zeros(1, 2))
    assert packed[0, 0] == 0 | (15 << 4) and packed[0, 5] == 5 | (10 << 4)
    assert torch.equal(dequantize_int4(packed, scale, lo), w)


@pytest.mark.parametrize("march", KERNEL_BUILDS)
def test_each_build_says_which_integer_dot_products_it_does(march):
    """qa8.c's path (logged at start): AVX-512 VNNI where the CPU has it, else AVX2, else
    plain C; the x86-64 builds pin what they can use."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    expected = {"x86-64": 0, "x86-64-v3": 1}.get(march)
    if expected is None:  # native
        expected = 2 if {"avx512_vnni", "avx512bw"} <= flags else \
            1 if {"avx2", "fma"} <= flags else 0
    assert kernels_for(march).qa8_path() == expected


def test_activations_round_to_int8_in_blocks_with_their_own_scale():
    """Blocks of ACT_BLOCK inputs, the last one short (K = 300), an all-zero block and
    blocks of very different magnitudes."""
    x = torch.randn(3, 300) * torch.logspace(-4, 2, 300)
    x[1, 32:64] = 0.0
    xq, xs = quantize_blocks(x)
    blocks = -(-300 // ACT_BLOCK)
    assert xq.shape == (3, blocks, ACT_BLOCK) and xs.shape == (3, blocks, 1)
    assert torch.equal(xq, xq.round()) and xq.abs().max() == 127
    assert torch.all(xq[1, 1] == 0) and xs[1, 1] == 0
    assert torch.all(xq[:, :, :].abs().amax(-1)[xs[..., 0] > 0] == 127)
    assert torch.all(xq[:, -1, 300 % ACT_BLOCK:] == 0)  # the padding
    # round to nearest: at most half a step of the block's own scale, whatever its size
    err = (round_activations(x) - x).abs()
    step = xs.expand(-1, -1, ACT_BLOCK).flatten(1)[:, :300]
    assert torch.all(err <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize(("mode", "weights"), [("w8a8", "int8"), ("w4a8", "int4")])
def test_int8_activations_cost_a_bounded_error(mode, weights):
    """w8a8/w4a8 compute with the weights of int8/int4 and the activations rounded: close
    to the weight-only result (within the rounding of int8 rows), yet not equal to it."""
    w = _weights(64, 576, seed=5)
    x = torch.randn(9, 576)
    a8 = QuantizedProjection(w, None, mode, kernels_for("native"))
    wo = QuantizedProjection(w, None, weights, kernels_for("native"))
    assert torch.equal(a8.dequantized(), wo.dequantized())
    y, ref = a8(x), wo(x)
    assert not torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.02, rel.max()


def test_int4_needs_inputs_in_whole_groups():
    with pytest.raises(QuantizeError, match=r"in_features \(48\).*group size 32"):
        quantize_int4(torch.randn(8, 48))


@pytest.mark.parametrize("march", KERNEL_BUILDS)
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16", "w8a8", "w4a8"])
def test_native_kernel_matches_the_reference(march, mode):
    """Any row count (the row blocks and their tails; int8 and int4 with AVX-512: the
    tiles of 2 channels x 12 rows from 16 rows on), with and without bias, a strided
    input; K not a multiple of the vector width for int8 and bf16 (w8a8: nor of 64, the
    VNNI step; w4a8: K = 96, a last block of 32), N not a multiple of 4 (the channel
    tiles)."""
    kernels = kernels_for(march)
    shapes = [(40, 64), (130, 576), (24, 96)] + (
        [(33, 70), (7, 100)] if mode not in ("int4", "w4a8") else [(7, 160)])
    rows = (1, 2, 3, 4, 5, 9, 16, 33) if mode != "bf16" else (1, 2, 3, 4, 5, 9,
                                                             BF16_GEMM_ROWS - 1)
    for n_out, k_in in shapes:
        w = _weights(n_out, k_in, seed=n_out)
        for bias in (None, torch.randn(n_out)):
            proj = QuantizedProjection(w, bias, mode, kernels)
            for m in rows:
                x = torch.randn(m, 2 * k_in)[:, ::2]  # row stride 2k, column stride 2
                y = proj(x)
                ref = proj.reference(x)
                assert y.shape == (m, n_out)
                torch.testing.assert_close(y, ref, rtol=1e-4,
                                           atol=1e-5 * float(ref.abs().max()) + 1e-6)
                # a row alone (its own summation order: 4 chains) agrees with it in a batch
                torch.testing.assert_close(proj(x[-1:]), y[-1:], rtol=1e-5,
                                           atol=1e-5 * float(ref.abs().max()) + 1e-6)


@pytest.mark.parametrize("march", KERNEL_BUILDS)
def test_fp32_few_row_kernel_matches_blas(march):
    """The fp32 decode projection (1 to 33 rows: the 8-row tiles and their tails, the
    one-row 4-chain path), with and without bias, strided input, K not a multiple of the
    vector width; bad operands are refused before any pointer reaches C."""
    kernels = kernels_for(march)
    torch.manual_seed(0)
    for n_out, k_in in ((40, 64), (130, 576), (33, 70)):
        w = torch.randn(n_out, k_in)
        for bias in (None, torch.randn(n_out)):
            for m in (1, 2, 5, 8, 9, 33):
                x = torch.randn(m, 2 * k_in)[:, ::2]
                ref = torch.nn.functional.linear(x, w, bias)
                torch.testing.assert_close(native_linear(kernels, x, w, bias), ref,
                                           rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_linear(kernels, torch.randn(2, 64, dtype=torch.float64), w[:, :64], None)
    with pytest.raises(ValueError, match="one dtype"):
        native_linear(kernels, torch.randn(2, 70), w.bfloat16(), None)
    with pytest.raises(ValueError, match=r"x \[R, 70\]"):
        native_linear(kernels, torch.randn(2, 64), w, None)
    with pytest.raises(ValueError, match="contiguous"):
        native_linear(kernels, torch.randn(2, 33), w.T, None)


@pytest.mark.parametrize("march", KERNEL_BUILDS)
def test_bf16_few_row_kernel_is_the_fp32_product_of_the_bf16_values(march):
    """A bf16 model's few-row projection: bf16 weights widened in registers, the product
    summed in fp32 and rounded once to bf16, so it is the fp32 product of the same bf16
    values rounded to bf16 (up to one bf16 step where the sums round differently)."""
    kernels = kernels_for(march)
    torch.manual_seed(0)
    for n_out, k_in in ((40, 64), (130, 576), (33, 70)):
        w = torch.randn(n_out, k_in).bfloat16()
        for bias in (None, torch.randn(n_out).bfloat16()):
            for m in (1, 2, 9, 31):
                x = torch.randn(m, k_in).bfloat16()
                exact = torch.nn.functional.linear(
                    x.float(), w.float(), None if bias is None else bias.float())
                y = native_linear(kernels, x, w, bias)
                assert y.dtype == torch.bfloat16 and y.shape == (m, n_out)
                torch.testing.assert_close(y.float(), exact, rtol=2 ** -7,
                                           atol=1e-3 * float(exact.abs().max()))


def test_bf16_weights_take_the_bf16_gemm_from_bf16_gemm_rows():
    """From BF16_GEMM_ROWS rows on, bf16 weights go to PyTorch's bf16 GEMM on the
    activations rounded to bf16: the fp32 product of the rounded values, up to the GEMM's
    own rounding of its result; fewer rows stay on the kernel, exact to fp32 rounding."""
    w, bias = _weights(96, 128, seed=5), torch.randn(96)
    proj = QuantizedProjection(w, bias, "bf16", kernels_for("native"))
    assert torch.equal(proj.dequantized(), w.bfloat16().float())
    assert proj.packed_nbytes == 0
    proj.prepack()  # --prepack-weights (auto: on for bf16 weights)
    for m in (BF16_GEMM_ROWS - 1, BF16_GEMM_ROWS, GEMM_ROWS + 5):
        x = torch.randn(m, 128)
        y = proj(x)
        rounded = torch.nn.functional.linear(x.bfloat16().float(), proj.dequantized(), bias)
        scale = float(rounded.abs().max())
        if m < BF16_GEMM_ROWS:
            torch.testing.assert_close(y, proj.reference(x), rtol=1e-4, atol=1e-5 * scale)
        else:
            assert not torch.equal(y, proj.reference(x))  # the activations were rounded
            torch.testing.assert_close(y, rounded, rtol=2 ** -7, atol=2 ** -8 * scale)
            # through oneDNN's pre-packed copy: PyTorch's GEMM on the plain weight, bit for bit
            plain = torch.nn.functional.linear(x.bfloat16(), proj.q).float() + bias
            assert torch.equal(y, plain)
    if torch.backends.mkldnn.is_available():  # the copy is counted (Engine.memory)
        assert proj.packed_nbytes == proj.q.numel() * proj.q.element_size()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_rows_go_through_blas_and_agree_with_the_kernel(mode):
    """From GEMM_ROWS rows on (a prefill chunk) the dequantized weight goes to BLAS; a row
    computed there agrees with the same row through the kernel (a decode step)."""
    w, bias = _weights(96, 128, seed=3), torch.randn(96)
    proj = QuantizedProjection(w, bias, mode, kernels_for("native"))
    for m in (GEMM_ROWS - 1, GEMM_ROWS, GEMM_ROWS + 37):
        x = torch.randn(m, 128)
        y = proj(x)
        assert torch.equal(y, proj.reference(x)) == (m >= GEMM_ROWS)
        tol = 1e-5 * float(y.abs().max()) + 1e-6
        torch.testing.assert_close(y, proj._native(x), rtol=1e-4, atol=tol)
        for r in (0, m - 1):
            torch.testing.assert_close(proj(x[r:r + 1]), y[r:r + 1], rtol=1e-4, atol=tol)


def test_load_model_rejects_an_unknown_mode(tiny_model):
    with pytest.raises(ModelLoadError, match="int3.*none, int8, int4, bf16, w8a8, w4a8, nf4"):
        load_model(tiny_model, torch.float32, torch.device("cpu"), "int3")


class _Int8ActivationsLinear(torch.nn.Linear):
    """nn.Linear of the input rounded to int8 in blocks (w8a8/w4a8's base matmuls); PEFT
    wraps it as any nn.Linear, its LoRA seeing the unrounded input."""

    def forward(self, x):
        return super().forward(round_activations(x))


def _dequantized_hf_model(tiny_model, mode: str):
    """transformers' model of `tiny_model` holding the weights our engine computes with
    under --quantize `mode` (each projection's dequantized weight, split back into
    q/k/v and gate/up; the output head and the tied embeddings dequantized; w8a8 and
    w4a8: each projection and the head rounding its input rows to int8)."""
    from transformers import AutoModelForCausalLM

    ours = load_model(tiny_model, torch.float32, torch.device("cpu"), mode)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    spec = ours.spec
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(ours.embed.weight)
        hf.lm_head.weight.copy_(ours.lm_head)  # tied: the same tensor
        for src, dst in zip(ours.layers, hf.model.layers, strict=True):
            assert isinstance(src.qkv, QuantizedProjection)
            q, k, v = src.qkv.dequantized().split([spec.q_size, spec.kv_size, spec.kv_size])
            gate, up = src.gate_up.dequantized().chunk(2)
            att, mlp = dst.self_attn, dst.mlp
            for lin, w in ((att.q_proj, q), (att.k_proj, k), (att.v_proj, v),
                           (att.o_proj, src.o.dequantized()), (mlp.gate_proj, gate),
                           (mlp.up_proj, up), (mlp.down_proj, src.down.dequantized())):
                assert not torch.equal(lin.weight, w)  # quantization changed it
                lin.weight.copy_(w)
                if mode in ACT8_MODES:
                    lin.__class__ = _Int8ActivationsLinear
    if mode in ACT8_MODES:
        hf.lm_head.__class__ = _Int8ActivationsLinear
    return hf


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-adapters")
    make_lora(tiny_model, root / "r16-all", r=16, targets=ALL_MODULES, seed=7)
    return root


def _bf16_adapter(adapter_dir: Path, out: Path) -> Path:
    """A copy of a PEFT LoRA adapter holding what bf16 slot tables hold (--adapter-dtype
    bfloat16): A rounded to bf16, B with its scale folded in rounded to bf16 (then the scale
    taken out again, which PEFT puts back), kept in fp32."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        if "lora_B" in key:
            t = (t * scale).bfloat16().float() / scale
        tensors[key] = t.bfloat16().float() if "lora_A" in key else t
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _oracle(hf, adapter_dir):
    """(adapter or '', prompt index) -> (tokens, logprobs) of PEFT's greedy generate."""
    from peft import PeftModel
    from transformers import GenerationConfig

    model = PeftModel.from_pretrained(hf, adapter_dir, adapter_name="r16-all")
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    results = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            for key in ("", "r16-all"):
                if key:
                    out = model.generate(input_ids=torch.tensor([prompt]), generation_config=gc)
                else:
                    with model.disable_adapter():
                        out = model.generate(input_ids=torch.tensor([prompt]),
                                             generation_config=gc)
                toks = out.sequences[0, len(prompt):].tolist()
                dists = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
                lps = [float(d[t]) for d, t in zip(dists, toks, strict=True)]
                results[(key, i)] = (toks, lps, dists)
    return results


def _first_difference(a: list[int], b: list[int]) -> int:
    """The first index where the two token lists differ (their length if none)."""
    return next((t for t, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def _request(adapter: str, prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True, logprobs=True))


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "kernels", "adapter_dtype"), [
    ("int8", "native", "auto"), ("int4", "native", "auto"), ("int4", "torch", "auto"),
    ("bf16", "native", "auto"), ("bf16", "native", "float32"), ("w8a8", "native", "auto"),
    ("w4a8", "native", "auto"), ("w8a8", "torch", "auto")])
def test_greedy_parity_with_peft_on_the_dequantized_weights(tiny_model, adapter_root, tmp_path,
                                                            start_server, mode, kernels,
                                                            adapter_dtype):
    """bf16 weights with --adapter-dtype auto keep bf16 slot tables: the oracle's adapter
    holds the same rounded weights (and with float32, the adapter as saved)."""
    adapter = adapter_root / "r16-all"
    if mode == "bf16" and adapter_dtype == "auto":
        adapter = _bf16_adapter(adapter, tmp_path / "r16-all")
    oracle = _oracle(_dequantized_hf_model(tiny_model, mode), adapter)
    from transformers import AutoModelForCausalLM

    plain = _oracle(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), adapter)
    # the quantized weights change some greedy tokens, or this test proves little
    assert any(oracle[k][0] != plain[k][0] for k in oracle)
    # w8a8/w4a8: so does the rounding of the activations (against the same weights alone).
    # The oracle's inputs cross rounding boundaries where ours differ by fp32 rounding
    # (summation order): one step of one activation moves a logprob by up to ~1e-2 here,
    # and may flip a near tie. So there the tokens are compared up to the first difference,
    # which must be a near tie in the oracle (its logprobs of the two tokens within the
    # tolerance), and the server must be closer to the oracle than to the same weights
    # without rounded activations (mean logprob difference over what was compared).
    # bf16 weights: the server must be closer to the oracle of its adapter dtype than to
    # the other's (the adapters' rounding is otherwise below the tolerance).
    tolerance, act8, near = 1e-3, mode in ACT8_MODES, None
    distance: dict[str, list[float]] = {"oracle": [], "other": []}
    if act8:  # the same weights without rounded activations
        near = _oracle(_dequantized_hf_model(tiny_model, ACT8_MODES[mode]), adapter)
        assert any(oracle[k][0] != near[k][0] for k in oracle)
        tolerance = 5e-2
    elif mode == "bf16":
        near = _oracle(_dequantized_hf_model(tiny_model, mode),
                       adapter_root / "r16-all" if adapter_dtype == "auto"
                       else _bf16_adapter(adapter, tmp_path / "rounded"))
    server = start_server("--base-model", tiny_model, "--adapter-dir", adapter_root,
                          "--quantize", mode, "--cpu-kernels", kernels, "--max-batch-size", 8,
                          "--adapter-dtype", adapter_dtype,
                          "--max-tokens-per-step", 24, "--max-seq-len", 256,
                          "--kv-cache-memory", "32MiB")
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.quantization == mode

    def check(result, key, i, label):
        name = f"{label} {key or 'base'} prompt {i}"
        tokens, logprobs, dists = oracle[(key, i)]
        got = list(result.token_ids)
        n = _first_difference(got, tokens) if act8 else len(tokens)
        if n < len(tokens):
            gap = float(dists[n][tokens[n]] - dists[n][got[n]])
            assert gap < tolerance, f"{name}: token {n} differs, not a near tie ({gap})"
        if near is not None:
            other, other_lps = near[(key, i)][:2]
            same = min(n, _first_difference(other, tokens))
            for ref, lps in (("oracle", logprobs), ("other", other_lps)):
                distance[ref] += [abs(a - b) for a, b in
                                  zip(result.logprobs[:same], lps[:same], strict=True)]
        assert got[:n] == tokens[:n], name
        diff = max(abs(a - b) for a, b in zip(result.logprobs[:n], logprobs[:n], strict=True))
        assert diff < tolerance, f"{name}: logprob off by {diff}"

    for key, i in oracle:  # alone: one-row decode steps, whole prefills
        check(stub.Generate(_request(key, PROMPTS[i]), timeout=60), key, i, "alone")
    results, errors = {}, []

    def call(key, i):
        try:
            results[(key, i)] = stub.Generate(_request(key, PROMPTS[i]), timeout=120)
        except grpc.RpcError as e:
            errors.append((key, i, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=k) for k in oracle]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (key, i), result in results.items():  # mixed: multi-row steps, chunked prefills
        check(result, key, i, "mixed")
    if near is not None:
        mean = {ref: sum(d) / len(d) for ref, d in distance.items()}
        assert mean["oracle"] < mean["other"], mean
