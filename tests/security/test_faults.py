"""Faults stay with their own load or request: broken adapter files fail only their load
(at start and through LoadAdapter) while other requests run on; a file half written fails
until it is complete; adapter files deleted while loaded keep serving from memory."""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest
from security_support import code_of, rpc_error
from support import wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

BROKEN = ["corrupt", "truncated", "missing-weights", "bad-config", "empty-weights"]
# A broken adapter found at start fails its request as NOT_FOUND (refused when scanned)
# or with the just-in-time load's error; never as an unexplained server fault.
JIT_LOAD_FAILED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                   grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def stubs(fault_server):
    with grpc.insecure_channel(fault_server.target) as ch:
        yield pb_grpc.TextGenerationStub(ch), pb_grpc.AdapterAdminStub(ch)


def tokens(stub, adapter: str = "", n: int = 12) -> list[int]:
    r = stub.Generate(pb.GenerateRequest(
        adapter_id=adapter, prompt="The weather today",
        stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=60)
    return list(r.token_ids)


def test_broken_adapters_fail_only_their_load_at_start(fault_server, stubs):
    """Found at start: either refused when scanned, or registered on the disk tier and
    refused when first loaded. Either way only their own requests fail."""
    stub, admin = stubs
    listed = {a.adapter_id for a in admin.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert {"tenant-a", "shared"} <= listed
    expected = tokens(stub, "tenant-a", 16)
    assert expected != tokens(stub, "", 16)
    results: list[list[int]] = []
    runner = threading.Thread(target=lambda: results.extend(
        tokens(stub, "tenant-a", 16) for _ in range(4)))
    runner.start()
    for name in BROKEN:
        err = rpc_error(stub.Generate, pb.GenerateRequest(adapter_id=name, prompt="x"),
                        timeout=30)
        assert err.code() in JIT_LOAD_FAILED, (name, err.code(), err.details())
        assert name in err.details() or name not in listed, err.details()
    runner.join(60)
    assert results == [expected] * 4


def test_loading_broken_files_fails_only_that_load(stubs):
    stub, admin = stubs
    expected = tokens(stub, "tenant-a", 16)
    results: list[list[int]] = []
    # Requests keep running on another adapter while the broken loads are refused.
    runner = threading.Thread(target=lambda: results.extend(
        tokens(stub, "tenant-a", 16) for _ in range(4)))
    runner.start()
    for name in BROKEN:
        err = rpc_error(admin.LoadAdapter, pb.LoadAdapterRequest(adapter_id=f"{name}-2",
                                                                 path=name), timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
    err = rpc_error(admin.LoadAdapter, pb.LoadAdapterRequest(adapter_id="gone",
                                                             path="no-such-dir"), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    runner.join(60)
    assert results == [expected] * 4


def test_half_written_adapter_fails_until_complete(stubs, fault_root, lora_source):
    stub, admin = stubs
    src = lora_source / "tenant-b"
    dest = fault_root / "incoming" / "midwrite"
    dest.mkdir()
    shutil.copy(src / "adapter_config.json", dest)
    data = (src / "adapter_model.safetensors").read_bytes()
    target = dest / "adapter_model.safetensors"
    load = pb.LoadAdapterRequest(adapter_id="midwrite", path="incoming/midwrite")
    with target.open("wb") as f:
        for cut in (0, 8, len(data) // 3, len(data) - 1):
            f.seek(0)
            f.truncate()
            f.write(data[:cut])
            f.flush()
            err = rpc_error(admin.LoadAdapter, load, timeout=30)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (cut, err.details())
        f.write(data[len(data) - 1:])
    assert admin.LoadAdapter(load, timeout=30).adapter.adapter_id == "midwrite"
    assert len(tokens(stub, "midwrite")) == 12
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="midwrite"), timeout=30)


def test_concurrent_write_and_load_never_internal(stubs, fault_root, lora_source):
    _, admin = stubs
    src = lora_source / "shared"
    dest = fault_root / "incoming" / "racing"
    dest.mkdir()
    shutil.copy(src / "adapter_config.json", dest)
    data = (src / "adapter_model.safetensors").read_bytes()
    done = threading.Event()

    def writer() -> None:
        for _ in range(20):
            with (dest / "adapter_model.safetensors").open("wb") as f:
                for i in range(0, len(data), 4096):
                    f.write(data[i:i + 4096])
                    f.flush()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    codes = set()
    load = pb.LoadAdapterRequest(adapter_id="racing", path="incoming/racing")
    while not done.is_set():
        codes.add(code_of(admin.LoadAdapter, load, timeout=30))
    t.join()
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, codes
    admin.LoadAdapter(load, timeout=30)
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="racing"), timeout=30)


def test_deleted_files_keep_serving_until_unloaded(stubs, fault_root, lora_source):
    stub, admin = stubs
    shutil.copytree(lora_source / "tenant-b", fault_root / "incoming" / "ephemeral")
    admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ephemeral",
                                            path="incoming/ephemeral"), timeout=30)
    before = tokens(stub, "ephemeral")
    shutil.rmtree(fault_root / "incoming" / "ephemeral")
    assert tokens(stub, "ephemeral") == before
    # Two device slots: using two other adapters evicts it; it comes back from host memory.
    tokens(stub, "tenant-a")
    tokens(stub, "shared")
    assert tokens(stub, "ephemeral") == before
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="ephemeral"), timeout=30)
    assert code_of(stub.Generate, pb.GenerateRequest(adapter_id="ephemeral", prompt="x"),
                   timeout=30) == grpc.StatusCode.NOT_FOUND
    assert code_of(admin.LoadAdapter, pb.LoadAdapterRequest(
        adapter_id="ephemeral", path="incoming/ephemeral"),
        timeout=30) == grpc.StatusCode.INVALID_ARGUMENT


def test_nan_adapter_fails_only_its_own_request(stubs, fault_root, lora_source):
    """A LoRA with NaN weights is refused at load; one with huge finite weights (3e38) loads, its
    activations overflow to Inf/NaN, and only its own requests fail (INTERNAL)."""
    import torch
    from safetensors.torch import load_file, save_file

    stub, admin = stubs
    dest = fault_root / "incoming" / "poisoned"
    shutil.copytree(lora_source / "tenant-b", dest)
    original = load_file(dest / "adapter_model.safetensors")
    load = pb.LoadAdapterRequest(adapter_id="poisoned", path="incoming/poisoned")
    for value, expected_code in ((float("nan"), grpc.StatusCode.INVALID_ARGUMENT),
                                 (3e38, grpc.StatusCode.OK)):
        tensors = {name: torch.full_like(t, value) if "lora_B" in name else t
                   for name, t in original.items()}
        save_file(tensors, dest / "adapter_model.safetensors")
        assert code_of(admin.LoadAdapter, load, timeout=30) == expected_code
    expected = tokens(stub, "tenant-a", 16)
    results: list = []

    def run_good() -> None:
        results.append(tokens(stub, "tenant-a", 16))

    threads = [threading.Thread(target=run_good) for _ in range(3)]
    for t in threads:
        t.start()
    err = rpc_error(stub.Generate, pb.GenerateRequest(
        adapter_id="poisoned", prompt="The weather today",
        stopping=pb.StoppingCriteria(max_new_tokens=16, ignore_eos=True)), timeout=60)
    for t in threads:
        t.join(60)
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="poisoned"), timeout=30)
    assert err.code() == grpc.StatusCode.INTERNAL and "poisoned" in err.details()
    assert results == [expected] * 3
    wait_for(lambda: tokens(stub, "tenant-a", 16) == expected, timeout=10)
