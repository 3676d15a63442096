"""Base models beyond plain Llama through the real server: greedy output equals
transformers' generate for the base and PEFT's for adapters, token for token (fp32), for
Qwen2 (q/k/v bias, a sliding window on one layer of two), Qwen3 (per-head q/k RMSNorm,
head_dim != hidden / heads), Llama with llama3 and linear RoPE scaling, Mistral with a
sliding window on every layer (prompts and generations longer than the window) and
Gemma 3 (sliding and global layers with their own RoPE bases, (1 + w) RMSNorms around
attention and MLP, GELU-tanh, scaled embeddings, query_pre_attn_scalar, logit
softcapping), Phi-3 (q/k/v and gate/up fused in the checkpoint, LoRA and IA3 on the
fused modules), YaRN RoPE and Phi-3's LongRoPE (short factors, then long ones past 32
tokens, as transformers switches per forward), with the native decode kernels and
PyTorch's ops.
A config the decoder cannot compute exactly is refused at start, naming field and value."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import grpc
import pytest
import torch
from support import make_lora, make_peft_adapter, make_tiny_model

from server.engine.loading import ModelLoadError, spec_from_hf_config
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

NEW_TOKENS = 48
# original_max_position_embeddings 32: with head_dim 16 some frequencies stay, one is
# smoothed, the rest are divided by the factor, all within the tests' context
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {  # name: make_tiny_model arguments (all 2 layers, hidden 64, random norms)
    # layer 1 slides (window 16), layer 0 attends to all: per-layer windows (layer_types)
    "qwen2": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
              "max_window_layers": 1},
    "qwen3": {"model_type": "qwen3", "head_dim": 32},  # q/k/v 4*32 and 2*32 wide
    "llama3-rope": {"model_type": "llama", "rope_scaling": LLAMA3_ROPE},
    "linear-rope": {"model_type": "llama", "rope_scaling": {"rope_type": "linear",
                                                            "factor": 4.0}},
    "mistral-window": {"model_type": "mistral", "sliding_window": 16},  # every layer
    # layer 0 slides (window 16, local RoPE base 1000), layer 1 is global (base 10000,
    # linear scaling); attention scale 24**-0.5, logits softcapped at 10
    "gemma3": {"model_type": "gemma3_text", "head_dim": 32, "sliding_window": 16,
               "layer_types": ["sliding_attention", "full_attention"],
               "query_pre_attn_scalar": 24, "final_logit_softcapping": 10.0,
               "rope_local_base_freq": 1000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "phi3": {"model_type": "phi3"},  # qkv_proj and gate_up_proj fused in the checkpoint
    # YaRN (Qwen2.5's long-context setting): fixed frequencies and attention factor
    "yarn-rope": {"model_type": "qwen2", "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    # Phi-3 128k's LongRoPE: short factors until a forward's sequence passes 32 tokens,
    # long ones after; the 45-token prompt is prefilled with the long ones in 24-token
    # chunks, the others switch while decoding
    "phi3-longrope": {"model_type": "phi3", "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0],
        "original_max_position_embeddings": 32}},
}
# name: config fields that take away what the family is tested for; transformers' output
# with them must differ from the family's (or the test would prove nothing)
PLAIN = {
    "qwen2": {"layer_types": ["full_attention"] * 2},
    "llama3-rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "linear-rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "mistral-window": {"sliding_window": None},
    "gemma3": {"layer_types": ["full_attention"] * 2},
    "yarn-rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "phi3-longrope": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}
# families with sliding-window layers: the server refuses prefix tuning on them (loading
# fails naming both; other requests go on)
SLIDING = {"qwen2", "mistral-window", "gemma3"}
# what decode steps run with PyTorch ops when the native kernels run the rest (logged once)
NATIVE_FALLBACKS = {"qwen3": "the per-head q/k RMSNorm (q_norm, k_norm)",
                    "gemma3": "the per-head q/k RMSNorm (q_norm, k_norm) and the "
                              "gelu_pytorch_tanh activation"}
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT's module names where the base fuses them: one LoRA A/B pair, one IA3 vector over
# the fused output
FUSED_MODULES = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                 "phi3-longrope": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
PROMPTS = [  # with 48 new tokens, all run past the windows of 16
    [1, 504, 2134, 28, 9043, 314, 7],
    list(range(200, 245)),  # chunked at 24 tokens per step: windows across chunks
    [42, 4242, 424, 24],
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model dir, adapter root, oracle): oracle[(adapter or '', prompt index)] =
    (tokens, logprobs) from transformers / PEFT; oracle[('plain', i)] the base with the
    PLAIN fields (RoPE scaling or sliding windows removed), which must differ from it."""
    from peft import IA3Config, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    name = request.param
    model = make_tiny_model(tmp_path_factory.mktemp(name), random_norms=True,
                            **FAMILIES[name])
    root = tmp_path_factory.mktemp(f"{name}-adapters")
    make_lora(model, root / "lora", r=8, targets=FUSED_MODULES.get(name, ALL_MODULES), seed=11)
    adapters = ["lora", "ia3", "prompt"] + ([] if name in SLIDING else ["prefix"])
    lm = TaskType.CAUSAL_LM
    if name == "phi3":  # output scaling of both fused modules, input scaling of down_proj
        ia3 = IA3Config(task_type=lm, target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                        feedforward_modules=["down_proj"])
    else:
        ia3 = IA3Config(task_type=lm, target_modules=["k_proj", "v_proj", "down_proj"],
                        feedforward_modules=["down_proj"])
    make_peft_adapter(model, root / "ia3", ia3, 12)
    make_peft_adapter(model, root / "prompt", PromptTuningConfig(
        task_type=lm, num_virtual_tokens=5), 13)
    make_peft_adapter(model, root / "prefix", PrefixTuningConfig(  # refused where SLIDING
        task_type=lm, num_virtual_tokens=6), 14)
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    oracle = {}
    for key in ["", "plain", *adapters]:
        if key == "plain":
            if name not in PLAIN:
                continue
            cfg = AutoConfig.from_pretrained(model)
            for field, value in PLAIN[name].items():
                setattr(cfg, field, value)
            ref = AutoModelForCausalLM.from_pretrained(model, config=cfg).eval()
        else:
            ref = AutoModelForCausalLM.from_pretrained(model).eval()
            if key:
                ref = PeftModel.from_pretrained(ref, root / key).eval()
        with torch.no_grad():
            for i, prompt in enumerate(PROMPTS):
                ids = torch.tensor([prompt])
                out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   generation_config=gc)
                toks = out.sequences[0, -NEW_TOKENS:].tolist()
                lps = [float(torch.log_softmax(s[0].float(), -1)[t])
                       for s, t in zip(out.scores, toks, strict=True)]
                oracle[(key, i)] = (toks, lps)
    return name, model, root, oracle


def _request(adapter: str, prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True, logprobs=True))


def _check(result, expected, label):
    tokens, logprobs = expected
    assert list(result.token_ids) == tokens, f"{label}: tokens differ from the reference"
    diff = max(abs(a - b) for a, b in zip(result.logprobs, logprobs, strict=True))
    assert diff < 1e-3, f"{label}: logprob differs from the reference by {diff}"


# the PyTorch-ops path per family in make test-slow (9 x 6 s; make test stays under 10
# minutes): the native path runs the families' PyTorch-only features (q/k norm, GELU-tanh)
# with those ops too, and test_parity.py runs the whole PyTorch path in make test
@pytest.mark.parametrize("kernels", ["native", pytest.param("torch", marks=pytest.mark.slow)])
def test_family_greedy_parity(family, start_server, kernels):
    name, model, root, oracle = family
    keys = sorted({k for k, _ in oracle} - {"plain"})
    # Adapters (and what PLAIN takes away) must change the output, or the test proves nothing.
    for key in [k for k, _ in oracle if k]:
        assert any(oracle[(key, i)][0] != oracle[("", i)][0] for i in range(len(PROMPTS))), key
    server = start_server(
        "--base-model", model, "--adapter-dir", root, "--max-active-adapters", 4,
        "--max-batch-size", 16, "--max-tokens-per-step", 24, "--max-seq-len", 256,
        "--kv-cache-memory", "32MiB", "--cpu-kernels", kernels)
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
    for key in keys:  # alone: single-row steps
        _check(stub.Generate(_request(key, PROMPTS[0]), timeout=60), oracle[(key, 0)],
               f"{name} {kernels} alone {key or 'base'}")
    if name in SLIDING:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(_request("prefix", PROMPTS[0]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "prefix tuning is not supported on a base with sliding-window attention" \
            in refused.value.details()
    results, errors = {}, []

    def call(key, i):
        try:
            results[(key, i)] = stub.Generate(_request(key, PROMPTS[i]), timeout=120)
        except grpc.RpcError as e:
            errors.append((key, i, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=(key, i))
               for key in keys for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (key, i), result in results.items():
        _check(result, oracle[(key, i)], f"{name} {kernels} mixed {key or 'base'} prompt {i}")
    fallback = [line for line in server.lines if "with PyTorch ops, the rest" in line]
    if kernels == "native" and name in NATIVE_FALLBACKS:
        assert len(fallback) == 1 and NATIVE_FALLBACKS[name] in fallback[0], fallback
    else:
        assert not fallback


def _config(model_type: str, **fields):
    from transformers import AutoConfig

    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}.get(model_type)
    fields.setdefault("architectures", [arch])
    return AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=1024, **fields)


@pytest.mark.parametrize("model_type, fields, message", [
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
     "rope_scaling.rope_type 'dynamic' is not supported (supported: default, linear, "
     "llama3, yarn, longrope)"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type 'dynamic' is not supported"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]},
     "layer_types ['chunked_attention', 'full_attention'] is not supported"),
    ("llama", {"hidden_act": "gelu"},
     "hidden_act 'gelu' is not supported (supported: silu, gelu_pytorch_tanh)"),
    ("gemma3_text", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0},
     "attn_logit_softcapping 50.0 is not supported"),
    ("gemma3_text", {"use_bidirectional_attention": True},
     "use_bidirectional_attention True is not supported"),
    ("gemma3_text", {"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}},
     "rope_scaling.rope_type 'dynamic' is not supported"),
    ("gpt2", {"architectures": ["GPT2LMHeadModel"]},
     "architecture ['GPT2LMHeadModel'] (model_type 'gpt2') is not supported (supported: "
     "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
     "Phi3ForCausalLM, Gemma3ForCausalLM)"),
    ("qwen2", {"architectures": ["LlamaForCausalLM"]}, "model_type 'qwen2') is not supported"),
    ("phi3", {"partial_rotary_factor": 0.5},
     "rope_scaling.partial_rotary_factor 0.5 is not supported (1.0 only)"),
    ("llama", {"partial_rotary_factor": 0.5},
     "rope_scaling.partial_rotary_factor 0.5 is not supported (1.0 only)"),
])
def test_unsupported_config_is_refused_naming_field_and_value(model_type, fields, message):
    with pytest.raises(ModelLoadError) as e:
        spec_from_hf_config(_config(model_type, **fields))
    assert message in str(e.value)


@pytest.mark.parametrize("model_type, fields, windows", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 2},
     ()),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 1},
     (0, 128)),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 128}, ()),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"],
               "use_sliding_window": True, "sliding_window": 64}, (64, 0)),
    ("mistral", {"sliding_window": None}, ()),
    ("mistral", {"sliding_window": 512}, (512, 512)),
    ("phi3", {"sliding_window": 512}, (512, 512)),
    ("llama", {}, ()),
])
def test_sliding_windows_read_per_layer(model_type, fields, windows):
    assert spec_from_hf_config(_config(model_type, **fields)).windows == windows


def test_switches_read_from_each_family_config():
    q2 = spec_from_hf_config(_config("qwen2"))
    q3 = spec_from_hf_config(_config("qwen3", head_dim=32, attention_bias=True))
    llama = spec_from_hf_config(_config("llama", attention_bias=True, mlp_bias=True))
    assert (q2.qkv_bias, q2.o_bias, q2.mlp_bias, q2.qk_norm) == (True, False, False, False)
    assert (q3.qkv_bias, q3.o_bias, q3.mlp_bias, q3.qk_norm) == (True, True, False, True)
    assert (q3.head_dim, q3.q_size, q3.hidden_size) == (32, 128, 64)
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.qk_norm) == (True,) * 3 + (
        False,)
    assert (llama.gemma, llama.activation, llama.attn_scale) == (False, "silu", 16**-0.5)
    gemma = spec_from_hf_config(_config(
        "gemma3_text", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0))
    assert (gemma.gemma, gemma.qk_norm, gemma.activation) == (True, True, "gelu_pytorch_tanh")
    assert (gemma.attn_scale, gemma.logit_softcap) == (24**-0.5, 30.0)
    assert (gemma.windows, gemma.rope_tables) == ((16, 0), (1, 0))


def test_refused_model_stops_the_start_with_one_line(tmp_path):
    """`switchboard serve` on a base it cannot run exactly: exit 2, the field and value."""
    model = make_tiny_model(tmp_path / "dynamic", model_type="qwen2",
                            rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--base-model", str(model),
         "--adapter-dir", str(tmp_path), "--port", "0", "--metrics-port", "-1"],
        env=dict(os.environ), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("error: rope_scaling.rope_type 'dynamic' is not supported (supported: default, "
            "linear, llama3, yarn, longrope)") in proc.stderr
