"""The peer and quality benchmarks' own logic (benchmarks/peers.py, quality.py) and
`make gpu-check` on a machine without a GPU: the benchmarks themselves run by `make
bench-peers` / `make gpu-check`, never here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import peers, quality

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_stops_clearly_without_a_cuda_device():
    gpu_json = REPO / "benchmarks" / "results" / "gpu.json"
    before = gpu_json.stat().st_mtime_ns if gpu_json.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert "gpu-check: parity" not in proc.stdout  # no step started
    after = gpu_json.stat().st_mtime_ns if gpu_json.exists() else None
    assert after == before  # no results written


def _res(single, base, adapters=None):
    tps = {"single": single, "base_32": base}
    if adapters is not None:
        tps["adapters_32"] = adapters
    return {"tokens_per_s": tps}


def test_ratios_pair_each_variant_with_the_same_bit_width():
    sb = {"fp32": _res(30, 240, 200), "int8": _res(20, 100, 90), "bf16": _res(40, 400, 240),
          "int4": {"skipped": "--quantize int4 is not one of none, int8, nf4"}}
    llama = {"F32": {"no_adapters": _res(60, 300), "16_loaded": _res(20, 100, 50)},
             "Q8_0": {"no_adapters": _res(100, 500), "16_loaded": _res(25, 110, 60)},
             "Q4_0": {"no_adapters": _res(200, 600), "16_loaded": _res(23, 100, 100)}}
    r = peers.ratios(sb, llama)
    assert set(r) == {"fp32_vs_F32", "int8_vs_Q8_0"}  # bf16 has no peer, int4 was skipped
    assert r["fp32_vs_F32"]["adapters_32"] == pytest.approx(200 / 50)
    assert r["fp32_vs_F32"]["base_32"] == pytest.approx(240 / 300)  # against no adapters
    assert r["fp32_vs_F32"]["single"] == pytest.approx(30 / 60)
    assert r["fp32_vs_F32"]["meets_bar"] == {"adapters_32": True, "base_32": False,
                                             "single": False}
    assert r["int8_vs_Q8_0"]["adapters_32"] == pytest.approx(90 / 60)
    # partial results, written while llama-server runs: a width without both servers yet
    del llama["Q8_0"]["16_loaded"], llama["F32"]
    assert peers.ratios(sb, llama) == {}


def test_bf16_needs_avx512_bf16_or_amx():
    assert peers.has_bf16(["avx2", "avx512_bf16"])
    assert peers.has_bf16(["avx2", "amx_bf16", "amx_tile"])
    assert not peers.has_bf16(["avx2", "avx512f", "fma"])


@pytest.mark.parametrize("module, argv, message", [
    (peers, ["--variants", "fp32,fp64"], "--variants: 'fp64' is not one of"),
    (peers, ["--quants", "Q5_K"], "--quants: 'Q5_K' is not one of"),
    (quality, ["--variants", "int3"], "--variants: 'int3' is not one of"),
    (quality, ["--agreement-tokens", "600", "--ctx", "512"], "--agreement-tokens 600 exceeds"),
])
def test_bad_arguments_name_the_flag(module, argv, message):
    with pytest.raises(SystemExit, match=message):
        module.main(argv)


def test_quality_perplexity_through_the_engine_equals_transformers(tiny_model):
    """The engine's logits and llama-perplexity's measure (chunks scored on their second
    half) give the perplexity transformers' model gives on the same tokens."""
    from transformers import AutoModelForCausalLM

    from server.engine.loading import load_model

    ctx = 32
    ids = [int(t) for t in torch.randint(3, 49000, (3 * ctx + 5,),
                                         generator=torch.Generator().manual_seed(0))]
    model = load_model(tiny_model, torch.float32, torch.device("cpu"))
    got = quality.score(model, ids, ctx, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(3):
            chunk = torch.tensor([ids[c * ctx : (c + 1) * ctx]])
            logp = torch.log_softmax(hf(chunk).logits[0], -1)
            for pos in range(ctx // 2 + 1, ctx):
                nll -= float(logp[pos - 1, chunk[0, pos]])
                count += 1
    assert got["scored_tokens"] == count == 3 * (ctx // 2 - 1)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["argmax"].shape == (ctx,)
