"""Adapters of ranks 1 to 128 on a server started with the default adapter flags: one
mixed concurrent batch, token for token equal to PEFT's greedy generate (fp32), with the
C kernels and with PyTorch's ops; a rank above the cap fails with both numbers."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from support import TINY_SPEC, make_lora

from server.adapters.slot_buckets import default_buckets, table_bytes
from server.config import EngineConfig
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

NEW_TOKENS = 20
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # id: (rank, target modules)
    "r1-qv": (1, ["q_proj", "v_proj"]),
    "r8-all": (8, ALL),
    "r16-ko-down": (16, ["k_proj", "o_proj", "down_proj"]),
    "r32-mlp": (32, ["gate_proj", "up_proj", "down_proj"]),
    "r64-attn": (64, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r128-all": (128, ALL),
}
TOO_LARGE = "r130-q"  # above the default cap (128)
PROMPTS = [
    [1, 504, 2134, 28, 9043, 314, 7],
    list(range(300, 340)),  # prefill rows of every bucket beside the decode rows
]


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        make_lora(tiny_model, root / name, r=r, targets=targets, seed=300 + i)
    make_lora(tiny_model, root / TOO_LARGE, r=130, targets=["q_proj"], seed=299)
    return root


@pytest.fixture(scope="module")
def oracle(tiny_model, adapter_root):
    """(adapter or '', prompt index) -> greedy tokens from PEFT's generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, adapter_root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_root / name, adapter_name=name)
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                          pad_token_id=0)
    results = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            for key in ["", *names]:
                if key:
                    model.set_adapter(key)
                    out = model.generate(input_ids=torch.tensor([prompt]), generation_config=gc)
                else:
                    with model.disable_adapter():
                        out = model.generate(input_ids=torch.tensor([prompt]),
                                             generation_config=gc)
                results[(key, i)] = out[0, len(prompt):].tolist()
    return results


def _request(adapter: str, prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True))


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_ranks_1_to_128_in_one_batch_with_default_flags(tiny_model, adapter_root, oracle,
                                                        start_server, kernels):
    # No adapter flag: --max-lora-rank, --max-active-adapters and --lora-slots at defaults.
    server = start_server("--base-model", tiny_model, "--adapter-dir", adapter_root,
                          "--cpu-kernels", kernels, "--enable-admin")
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.TextGenerationStub(channel)
    for name in ADAPTERS:  # each adapter changes the output, or the test proves nothing
        assert any(oracle[(name, i)] != oracle[("", i)] for i in range(len(PROMPTS))), name

    # Every (adapter, prompt) pair at once: the batches mix all five rank buckets.
    results, errors = {}, []
    barrier = threading.Barrier(len(PROMPTS) * (len(ADAPTERS) + 1))

    def call(key, i):
        barrier.wait()
        try:
            results[(key, i)] = stub.Generate(_request(key, PROMPTS[i]), timeout=120)
        except grpc.RpcError as e:
            errors.append((key, i, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=(key, i))
               for key in ["", *ADAPTERS] for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (key, i), result in results.items():
        assert list(result.token_ids) == oracle[(key, i)], f"{key or 'base'} prompt {i}"

    # Each adapter sits in its rank's bucket (slots numbered bucket after bucket), and
    # the reported memory is the five tables, each of its own rank.
    buckets = default_buckets(EngineConfig().max_lora_rank, EngineConfig().max_active_adapters)
    assert buckets == ((8, 16), (16, 16), (32, 8), (64, 4), (128, 2))
    firsts = {rank: sum(n for _, n in buckets[:k]) for k, (rank, _) in enumerate(buckets)}
    admin = pb_grpc.AdapterAdminStub(channel)
    listed = {a.adapter_id: a for a in admin.ListAdapters(pb.ListAdaptersRequest()).adapters}
    for name, (rank, _) in ADAPTERS.items():
        bucket = min(b for b, _ in buckets if b >= rank)
        assert listed[name].rank == rank and listed[name].tier == pb.ADAPTER_TIER_DEVICE
        assert firsts[bucket] <= listed[name].slot < firsts[bucket] + dict(buckets)[bucket]
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.max_lora_rank, info.max_active_adapters) == (128, 16)
    slot_bytes = next(m.bytes for m in info.memory if m.part == "adapter_slots")
    assert slot_bytes == sum(table_bytes(TINY_SPEC, n, r, torch.float32) for r, n in buckets)

    # A rank above the cap: refused by LoadAdapter and by a request, naming both numbers.
    with pytest.raises(grpc.RpcError) as err:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="big", path=TOO_LARGE))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 130 is greater than max rank 128" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_request(TOO_LARGE, PROMPTS[0]), timeout=60)
    assert "rank 130 is greater than max rank 128" in err.value.details()
