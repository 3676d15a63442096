"""Automatic prefix caching (server.engine.prefix_cache): the store step by step, then the
real server reusing a prompt's blocks across requests of one adapter, never across
adapters or versions, with the same tokens as a server without the cache."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from support import http_call, make_lora, metric

from server.engine.model import KVCache
from server.engine.prefix_cache import PrefixCache
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc


class _Spec:
    num_layers, num_kv_heads, head_dim = 2, 1, 4


def _cache(blocks: int, block: int = 4) -> PrefixCache:
    kv = KVCache(_Spec, rows=2, max_len=32, dtype=torch.float32, device="cpu")
    per_token = KVCache.bytes_per_token(_Spec, torch.float32)
    return PrefixCache(kv, blocks * block * per_token, per_token, block=block)


def _fill(kv: KVCache, row: int, seed: float) -> None:
    for layer in range(len(kv.k)):
        n = kv.k[layer][row].numel()
        kv.k[layer][row] = (torch.arange(n, dtype=torch.float32) + seed + layer).view_as(
            kv.k[layer][row])
        kv.v[layer][row] = -kv.k[layer][row]


def test_names_chain_over_the_adapter_and_every_earlier_block():
    c = _cache(8)
    a = c.digests("", list(range(10)))  # two full blocks of 4; the 2 left over have none
    assert len(a) == 2 and len(set(a)) == 2
    assert c.digests("", list(range(8)) + [99]) == a  # same blocks, same names
    assert c.digests("lora\0 1", list(range(10)))[0] != a[0]  # another adapter
    assert c.digests("", [9, 1, 2, 3, 4, 5, 6, 7])[1] != a[1]  # same block 1, other block 0


def test_store_then_load_copies_the_blocks_and_leaves_the_last_token_to_compute():
    c = _cache(8)
    _fill(c.kv, 0, seed=1.0)
    names = c.digests("", list(range(12)))
    assert c.store(names, 0, row=0) == 3 and len(c) == 3
    assert c.store(names, 0, row=0) == 0  # already there
    # a 12-token prompt may reuse 2 blocks (its last token must run); a 13-token one 3
    assert len(c.match(names, prompt_len=12)) == 2
    blocks = c.match(names, prompt_len=13)
    assert len(blocks) == 3
    c.load(blocks, row=1)
    for layer in range(2):
        assert torch.equal(c.kv.k[layer][1, :, :12], c.kv.k[layer][0, :, :12])
        assert torch.equal(c.kv.v[layer][1, :, :12], c.kv.v[layer][0, :, :12])
        assert not torch.equal(c.kv.k[layer][1, :, 12:], c.kv.k[layer][0, :, 12:])
    # a prompt that differs in its second block reuses the first only
    other = c.digests("", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert len(c.match(other, prompt_len=13)) == 1


def test_eviction_is_least_recently_used_and_takes_a_chain_from_its_end():
    c = _cache(3)
    _fill(c.kv, 0, seed=0.0)
    first = c.digests("", list(range(8)))  # 2 blocks
    c.store(first, 0, row=0)
    second = c.digests("b", list(range(8)))
    c.store(second, 0, row=0)  # 3 blocks fit: the first chain's last block goes
    assert len(c) == 3
    assert len(c.match(first, prompt_len=9)) == 1
    assert len(c.match(second, prompt_len=9)) == 2
    assert c.nbytes == 3 * c.block_bytes
    assert not _cache(0).enabled


PROMPT = list(range(3, 43))  # 40 tokens: two full blocks of 16 can be reused


def _gen(stub, adapter: str = "", prompt=PROMPT, tokens: int = 12) -> list[int]:
    r = stub.Generate(pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=120)
    return list(r.token_ids)


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(tiny_model, root / "kv", r=4, targets=["k_proj", "v_proj"], seed=1)
    make_lora(tiny_model, root / "kv-other", r=4, targets=["k_proj", "v_proj"], seed=2)
    make_lora(tiny_model, root / "incoming" / "kv-v2", r=4, targets=["k_proj", "v_proj"],
              seed=3)
    return root


def test_server_reuses_a_prompt_prefix_per_adapter_with_the_same_tokens(tiny_model, root,
                                                                        start_server):
    common = ["--base-model", tiny_model, "--adapter-dir", root, "--max-seq-len", 128,
              "--kv-cache-memory", "16MiB"]
    plain = start_server(*common, "--prefix-cache-memory", 0)
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(plain.target))
    expected = {a: _gen(stub, a) for a in ("", "kv", "kv-other")}
    longer = _gen(stub, "kv", prompt=PROMPT + [50, 51])
    plain.stop()

    server = start_server(*common, "--metrics-port", 0, "--http-port", 0, "--enable-admin")
    channel = grpc.insecure_channel(server.target)
    stub, admin = pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)

    def hits() -> float:
        return metric(server.metrics_port, "switchboard_prefix_cache_hit_tokens_total")

    def queried() -> float:  # the server's warm-up request counts too
        return metric(server.metrics_port, "switchboard_prefix_cache_queried_tokens_total")

    queried_before = queried()

    assert _gen(stub, "kv") == expected["kv"] and hits() == 0  # computed, then stored
    assert _gen(stub, "kv") == expected["kv"] and hits() == 32  # two blocks reused
    assert _gen(stub, "kv", prompt=PROMPT + [50, 51]) == longer and hits() == 64
    # the base model and another adapter have their own keys and values
    assert _gen(stub, "") == expected[""] and hits() == 64
    assert _gen(stub, "kv-other") == expected["kv-other"] and hits() == 64
    assert _gen(stub, "") == expected[""] and hits() == 96
    assert queried() - queried_before == 5 * 40 + 42

    # a replaced adapter is a new chain: its first request computes its whole prompt
    r = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="kv", path="incoming/kv-v2"),
                          timeout=60)
    assert r.replaced
    replaced = _gen(stub, "kv")
    assert hits() == 96 and replaced != expected["kv"]
    assert _gen(stub, "kv") == replaced and hits() == 128

    # the OpenAI usage reports the reused tokens
    status, _, text = http_call(server, "/v1/completions",
                                {"model": "kv-other", "prompt": PROMPT, "max_tokens": 2})
    assert status == 200
    usage = json.loads(text)["usage"]
    assert usage["prompt_tokens"] == 40
    assert usage["prompt_tokens_details"] == {"cached_tokens": 32}
