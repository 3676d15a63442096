"""Adapter lifecycle through the real server: hot swap under concurrent load, just-in-time
loading with more adapters than slots, --watch, and a quantized base."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from support import make_lora, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

PROMPT = [1, 504, 2134, 28, 9043, 314, 7]


def gen(stub, adapter, tokens=16, prompt=PROMPT):
    r = stub.Generate(pb.GenerateRequest(
        adapter_id=adapter, token_ids=pb.TokenIds(ids=prompt),
        stopping=pb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=120)
    return r.adapter_version, list(r.token_ids)


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(4):
        make_lora(tiny_model, root / f"jit-{i}", r=4, targets=["q_proj", "v_proj"], seed=i)
    make_lora(tiny_model, root / "swap", r=8, targets=["o_proj"], seed=10)
    make_lora(tiny_model, root / "incoming" / "swap-v2", r=8, targets=["o_proj"], seed=11)
    return root


def test_hot_swap_under_load(tiny_model, root, start_server):
    server = start_server("--base-model", tiny_model, "--adapter-dir", root, "--enable-admin",
                          "--max-active-adapters", 4, "--max-seq-len", 160,
                          "--kv-cache-memory", "16MiB")
    channel = grpc.insecure_channel(server.target)
    stub, admin = pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
    expected = {"1": gen(stub, "swap")[1]}
    long_v1 = gen(stub, "swap", tokens=120)[1]
    results, errors = [], []
    long_result = {}
    started = threading.Event()

    def long_call():
        call = stub.GenerateStream(pb.GenerateRequest(
            adapter_id="swap", token_ids=pb.TokenIds(ids=PROMPT),
            stopping=pb.StoppingCriteria(max_new_tokens=120, ignore_eos=True),
            response=pb.ResponseOptions(token_ids=True)), timeout=120)
        tokens = []
        for chunk in call:
            started.set()
            tokens += chunk.token_ids
            long_result["version"] = chunk.adapter_version
        long_result["tokens"] = tokens

    def worker():
        for _ in range(5):
            try:
                results.append(gen(stub, "swap"))
            except grpc.RpcError as e:
                errors.append((e.code(), e.details()))

    threads = [threading.Thread(target=long_call)] + [threading.Thread(target=worker)
                                                      for _ in range(4)]
    threads[0].start()
    assert started.wait(60)
    for t in threads[1:]:
        t.start()
    r = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="swap", path="incoming/swap-v2"))
    assert r.replaced and r.adapter.version == "2"  # 1 at scan (loaded just in time)
    for t in threads:
        t.join()
    expected["2"] = gen(stub, "swap")[1]
    assert not errors
    assert expected["1"] != expected["2"]
    assert long_result == {"version": "1", "tokens": long_v1}  # finished on its version
    assert len(results) == 20 and "2" in {version for version, _ in results}
    for version, tokens in results:
        assert tokens == expected[version]
    assert gen(stub, "swap")[0] == "2"


def test_swap_or_unload_while_a_request_waits_for_a_slot(tiny_model, root, start_server):
    """One slot, held by a long stream: a request for another adapter waits. Swapping that
    adapter meanwhile gives the waiting request the new version once a slot frees (it has
    not started, so it is a new request); unloading it fails the waiting one NOT_FOUND."""
    server = start_server("--base-model", tiny_model, "--adapter-dir", root, "--enable-admin",
                          "--max-active-adapters", 1, "--max-seq-len", 1100,
                          "--kv-cache-memory", "16MiB")
    channel = grpc.insecure_channel(server.target)
    stub, admin = pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
    v2 = gen(stub, "swap")  # version 1 at scan, loaded just in time
    assert v2[0] == "1"
    admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="swap", path="incoming/swap-v2"))
    want_v2 = gen(stub, "swap")
    assert want_v2[0] == "2"
    admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="swap", path="swap"))  # version 3

    for action in ("swap", "unload"):
        hold = stub.GenerateStream(pb.GenerateRequest(
            adapter_id="jit-0", token_ids=pb.TokenIds(ids=PROMPT),
            stopping=pb.StoppingCriteria(max_new_tokens=1000, ignore_eos=True)), timeout=120)
        next(hold)  # jit-0 holds the only slot
        waiting = stub.Generate.future(pb.GenerateRequest(
            adapter_id="swap", token_ids=pb.TokenIds(ids=PROMPT),
            stopping=pb.StoppingCriteria(max_new_tokens=16, ignore_eos=True),
            response=pb.ResponseOptions(token_ids=True)), timeout=60)
        time.sleep(0.5)
        assert not waiting.done()
        if action == "swap":
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="swap", path="incoming/swap-v2"))
        else:
            admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="swap"))
        hold.cancel()
        if action == "swap":
            r = waiting.result()
            assert (r.adapter_version, list(r.token_ids)) == ("4", want_v2[1])
        else:
            assert waiting.exception().code() == grpc.StatusCode.NOT_FOUND
            assert "unloaded before this request started" in waiting.exception().details()
    assert gen(stub, "jit-1")[0] == "1"  # the server goes on


def test_more_adapters_than_slots_load_just_in_time(tiny_model, root, start_server):
    server = start_server("--base-model", tiny_model, "--adapter-dir", root, "--enable-admin",
                          "--max-active-adapters", 2, "--max-seq-len", 160,
                          "--kv-cache-memory", "16MiB")
    channel = grpc.insecure_channel(server.target)
    stub, admin = pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
    tiers = {a.adapter_id: a.tier for a in admin.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert tiers["jit-0"] == pb.ADAPTER_TIER_DISK
    alone = {f"jit-{i}": gen(stub, f"jit-{i}")[1] for i in range(4)}
    assert len({tuple(v) for v in alone.values()}) == 4
    out, errors = {}, []

    def call(name, k):
        try:
            out[(name, k)] = gen(stub, name)[1]
        except grpc.RpcError as e:
            errors.append((name, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=(f"jit-{i}", k))
               for i in range(4) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(tokens == alone[name] for (name, _), tokens in out.items())
    listed = admin.ListAdapters(pb.ListAdaptersRequest()).adapters
    assert sum(a.tier == pb.ADAPTER_TIER_DEVICE for a in listed) <= 2


def test_watch_picks_up_added_and_removed(tiny_model, root, tmp_path, start_server):
    work = tmp_path / "root"
    work.mkdir()
    shutil.copytree(root / "jit-0", work / "first")
    server = start_server("--base-model", tiny_model, "--adapter-dir", work, "--enable-admin",
                          "--watch", 0.2, "--max-seq-len", 160, "--kv-cache-memory", "16MiB")
    channel = grpc.insecure_channel(server.target)
    stub, admin = pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel)

    def ids():
        return {a.adapter_id for a in admin.ListAdapters(pb.ListAdaptersRequest()).adapters}

    assert ids() == {"first"}
    shutil.copytree(root / "jit-1", work / "second")
    wait_for(lambda: "second" in ids(), timeout=30)
    assert len(gen(stub, "second")[1]) == len(gen(stub, "first")[1]) == 16
    shutil.rmtree(work / "first")
    wait_for(lambda: ids() == {"second"}, timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        gen(stub, "first")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_nf4_base_with_full_precision_adapter(tiny_model, root, start_server):
    server = start_server("--base-model", tiny_model, "--adapter-dir", root, "--quantize", "nf4",
                          "--max-seq-len", 160, "--kv-cache-memory", "16MiB")
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.quantization == "nf4"
    memory = {m.part: m.bytes for m in info.memory}
    # fp32 would hold every parameter in 4 bytes; the projections now take half a byte.
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model)
    embed = cfg.vocab_size * cfg.hidden_size * 4
    assert embed < memory["base_model"] < embed * 1.2
    base = gen(stub, "")[1]
    assert len(base) == 16 and gen(stub, "jit-0")[1] != base


def test_native_kernels_without_a_compiler_stop_the_start_with_the_reason(tiny_model,
                                                                          tmp_path):
    """--cpu-kernels native where nothing can build them: exit 2 and one line saying why
    (auto would serve with PyTorch's ops instead; tests/server/test_lora_ops.py)."""
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"),
               SWITCHBOARD_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--base-model", str(tiny_model),
         "--adapter-dir", str(tmp_path), "--port", "0", "--metrics-port", "-1",
         "--cpu-kernels", "native"],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: C compiler" in proc.stderr and "does not run" in proc.stderr
