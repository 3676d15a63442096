"""`--dtype auto` (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere), decided from
a flag set so that the test does not depend on this machine's CPU; and bf16 serving is
correct on any CPU (with or without bf16 hardware): greedy output through the server in
bf16, base model and a LoRA adapter, against transformers/PEFT in fp32 teacher-forced on
the same tokens, within bf16's precision."""

from __future__ import annotations

import grpc
import pytest
import torch
from support import make_lora

from server.engine.engine import (
    BF16_CPU_FLAGS,
    auto_dtype,
    cpu_flags,
    pick_adapter_dtype,
    pick_precision,
)
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

ZEN4_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16",
                         "amx_int8"}
ZEN3_FLAGS = {"avx2", "fma", "f16c"}  # this kind of CPU: no bf16 in hardware
SKYLAKE_X_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(("device", "flags", "expected"), [
    ("cpu", ZEN4_FLAGS, torch.bfloat16),
    ("cpu", SAPPHIRE_RAPIDS_FLAGS, torch.bfloat16),
    ("cpu", {"avx2", "amx_bf16"}, torch.bfloat16),
    ("cpu", ZEN3_FLAGS, torch.float32),
    ("cpu", SKYLAKE_X_FLAGS, torch.float32),  # AVX-512 without its bf16 extension
    ("cpu", {"amx_tile", "amx_int8"}, torch.float32),  # AMX without its bf16 unit
    ("cpu", set(), torch.float32),  # no /proc/cpuinfo
    ("cuda", set(), torch.bfloat16),
    ("cuda", ZEN3_FLAGS, torch.bfloat16),
    ("mps", ZEN4_FLAGS, torch.float32),
])
def test_auto_dtype_from_cpu_flags(device, flags, expected):
    assert auto_dtype(device, frozenset(flags)) == expected


def test_auto_on_this_machine_follows_its_flags():
    """auto on a CPU: fp32 activations, with bf16 weights where the CPU has native bf16
    (all in bf16 with --cpu-kernels torch, where no C kernel keeps fp32 fast)."""
    cpu = torch.device("cpu")
    bf16_cpu = bool(BF16_CPU_FLAGS & cpu_flags())
    assert pick_precision("auto", cpu) == (torch.float32, "bf16" if bf16_cpu else "none")
    assert pick_precision("auto", cpu, "none", "torch") == (
        (torch.bfloat16 if bf16_cpu else torch.float32), "none")
    assert pick_precision("bf16", cpu) == (torch.bfloat16, "none")
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto"):
        pick_precision("fp8", cpu)


@pytest.mark.parametrize(("quantize", "cpu_kernels"), [
    ("int8", "auto"), ("int4", "auto"), ("bf16", "auto"), ("int4", "native"), ("nf4", "auto")])
def test_auto_keeps_a_quantize_asked_for_with_fp32_activations(quantize, cpu_kernels):
    """On any CPU, bf16 or not: a `--quantize` asked for is kept, on fp32 activations (the
    int8/int4/bf16 kernels take fp32); an explicit dtype is kept too."""
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu, quantize, cpu_kernels) == (torch.float32, quantize)
    assert pick_precision("bf16", cpu, quantize, cpu_kernels) == (torch.bfloat16, quantize)
    if torch.cuda.is_available():
        assert pick_precision("auto", torch.device("cuda"), quantize, cpu_kernels) == (
            torch.bfloat16, quantize)


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(("name", "dtype", "quantize", "kernels", "expected"), [
    ("auto", F32, "bf16", True, BF16),  # what --dtype auto serves on a bf16 CPU
    ("auto", F32, "bf16", False, F32),  # bf16 tables under fp32 rows need the kernel
    ("auto", F32, "none", True, F32),
    ("auto", F32, "w8a8", True, F32),
    ("auto", BF16, "none", False, BF16),  # --dtype bfloat16: tables follow the activations
    ("float32", F32, "bf16", True, F32),  # exact fp32 adapters over bf16 weights
    ("bfloat16", F32, "none", True, BF16),
    ("bfloat16", BF16, "none", False, BF16),
])
def test_adapter_dtype(name, dtype, quantize, kernels, expected):
    assert pick_adapter_dtype(name, dtype, quantize, kernels) == expected


@pytest.mark.parametrize(("name", "dtype", "kernels"), [
    ("bfloat16", F32, False), ("float32", BF16, True), ("float32", torch.float16, False)])
def test_adapter_dtype_refused_where_no_kernel_takes_it(name, dtype, kernels):
    with pytest.raises(ValueError, match=f"--adapter-dtype {name} under"):
        pick_adapter_dtype(name, dtype, "none", kernels)


NEW_TOKENS = 24
PROMPTS = [[1, 504, 2134, 28, 9043, 314, 7], list(range(200, 237))]
# bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 relative, and the
# logits of the tiny model (|logit| up to ~30) come out of a few dozen such ops. Measured
# here (96 tokens): log-probs within 0.022 of fp32's, 94 of 96 greedy tokens fp32's
# argmax and the other two 0.0075 below it; the bounds leave 4x (bf16's error is not
# tied to one machine's BLAS).
LOGPROB_TOL = 0.1
NEAR_TIE = 0.05  # a bf16 argmax may differ from fp32's only between near-equal tokens


@pytest.mark.slow
def test_bf16_serving_matches_fp32_within_bf16_precision(tiny_model, tmp_path, start_server):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path / "adapters"
    make_lora(tiny_model, root / "r16-all", r=16, seed=11,
              targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"])
    server = start_server("--base-model", tiny_model, "--adapter-dir", root, "--dtype",
                          "bfloat16", "--max-seq-len", 256, "--kv-cache-memory", "32MiB")
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model).eval(),
                                     root / "r16-all", adapter_name="r16-all")
    worst_lp, worst_gap, same, total = 0.0, 0.0, 0, 0
    for key in ("", "r16-all"):
        for prompt in PROMPTS:
            r = stub.Generate(pb.GenerateRequest(
                adapter_id=key, token_ids=pb.TokenIds(ids=prompt),
                stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                response=pb.ResponseOptions(token_ids=True, logprobs=True)), timeout=60)
            toks = list(r.token_ids)
            assert len(toks) == NEW_TOKENS
            ids = torch.tensor([prompt + toks])
            with torch.no_grad():
                if key:
                    logits = peft(input_ids=ids).logits[0]
                else:
                    with peft.disable_adapter():
                        logits = peft(input_ids=ids).logits[0]
            lps = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)  # teacher-forced
            for step, (tok, lp) in enumerate(zip(toks, r.logprobs, strict=True)):
                ref = lps[step]
                worst_lp = max(worst_lp, abs(lp - float(ref[tok])))
                worst_gap = max(worst_gap, float(ref.max() - ref[tok]))
                same += int(ref.argmax()) == tok
                total += 1
    assert worst_lp < LOGPROB_TOL, f"a bf16 log-prob is {worst_lp:.3f} off fp32's"
    assert worst_gap < NEAR_TIE, f"a bf16 greedy token is {worst_gap:.3f} below fp32's best"
    assert same >= 0.9 * total, f"only {same} of {total} greedy tokens are fp32's argmax"
