"""Every adapter type through the real server equals its reference (PEFT, or the
trainer's bottleneck module) token for token, alone and all types in one concurrent mix."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from support import make_bottleneck, make_lora, make_peft_adapter

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

NEW_TOKENS = 32
PROMPTS = [[1, 504, 2134, 28, 9043, 314, 7], list(range(300, 330))]


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    from peft import (
        IA3Config,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    root = tmp_path_factory.mktemp("adapters")
    lm = TaskType.CAUSAL_LM
    make_peft_adapter(tiny_model, root / "ia3", IA3Config(
        task_type=lm, target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"]), 1)
    make_peft_adapter(tiny_model, root / "prompt", PromptTuningConfig(
        task_type=lm, num_virtual_tokens=5), 2)
    make_peft_adapter(tiny_model, root / "ptuning", PromptEncoderConfig(
        task_type=lm, num_virtual_tokens=4, encoder_hidden_size=32), 3)
    make_peft_adapter(tiny_model, root / "prefix", PrefixTuningConfig(
        task_type=lm, num_virtual_tokens=6), 4)
    make_bottleneck(tiny_model, root / "bottleneck", 5)
    make_lora(tiny_model, root / "lora", r=8, targets=["q_proj", "up_proj"], seed=6)
    return root


NAMES = ["ia3", "prompt", "ptuning", "prefix", "bottleneck", "lora"]


@pytest.fixture(scope="module")
def oracle(tiny_model, adapter_root):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trainer.methods.bottleneck import BottleneckConfig, apply_bottleneck

    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                          pad_token_id=0)
    out = {}
    for name in ["", *NAMES]:
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        if name == "bottleneck":
            path = adapter_root / name
            cfg = BottleneckConfig.from_json((path / "bottleneck_config.json").read_text())
            apply_bottleneck(base, cfg, load_file(path / "adapter_model.safetensors"))
            model = base
        elif name:
            model = PeftModel.from_pretrained(base, adapter_root / name).eval()
        else:
            model = base
        with torch.no_grad():
            for i, prompt in enumerate(PROMPTS):
                ids = torch.tensor([prompt])
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     generation_config=gc)
                out[(name, i)] = seq[0, -NEW_TOKENS:].tolist()
    return out


def _request(adapter, prompt):
    return pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True))


def test_every_type_alone_and_mixed(tiny_model, adapter_root, oracle, start_server):
    for name in NAMES:  # each adapter changes the output, or the test proves nothing
        assert any(oracle[(name, i)] != oracle[("", i)] for i in range(len(PROMPTS))), name
    server = start_server("--base-model", tiny_model, "--adapter-dir", adapter_root,
                          "--max-active-adapters", 8, "--max-seq-len", 128,
                          "--kv-cache-memory", "16MiB", "--enable-admin")
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.TextGenerationStub(channel)
    listed = {a.adapter_id: a.method for a in pb_grpc.AdapterAdminStub(channel).ListAdapters(
        pb.ListAdaptersRequest()).adapters}
    assert listed == {"ia3": "ia3", "prompt": "prompt_tuning", "ptuning": "p_tuning",
                      "prefix": "prefix_tuning", "bottleneck": "bottleneck", "lora": "lora"}
    for name in ["", *NAMES]:
        got = list(stub.Generate(_request(name, PROMPTS[0]), timeout=60).token_ids)
        assert got == oracle[(name, 0)], f"{name or 'base'} alone differs from its reference"
    results, errors = {}, []

    def call(name, i):
        try:
            results[(name, i)] = list(stub.Generate(_request(name, PROMPTS[i]),
                                                    timeout=120).token_ids)
        except grpc.RpcError as e:
            errors.append((name, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=(name, i))
               for name in ["", *NAMES] for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, tokens in results.items():
        assert tokens == oracle[key], f"{key[0] or 'base'} prompt {key[1]} differs in the mix"
