"""The gRPC API against a real server process: bad input gets its status code and the
server keeps answering; adapter admin; sampling; stop sequences; cancellation."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import make_lora, make_tiny_model

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(tiny_model, root / "tenant-a", r=8, targets=["q_proj", "v_proj"], seed=1)
    other = make_tiny_model(tmp_path_factory.mktemp("other"), hidden=96, intermediate=192)
    make_lora(other, root / "incoming" / "wrong-base", r=8, targets=["q_proj"], seed=2)
    make_lora(tiny_model, root / "incoming" / "tenant-b", r=4, targets=["o_proj"], seed=3)
    return root


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root):
    from support import ServerProcess

    s = ServerProcess(["--base-model", str(tiny_model), "--adapter-dir", str(adapter_root),
                       "--max-seq-len", "256", "--kv-cache-memory", "32MiB",
                       "--max-new-tokens", "128", "--max-stop-sequences", "4",
                       "--enable-admin"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.target)
    return pb_grpc.TextGenerationStub(channel), pb_grpc.AdapterAdminStub(channel), channel


def good(stub, adapter: str = "") -> list[int]:
    r = stub.Generate(pb.GenerateRequest(
        adapter_id=adapter, prompt="The weather today",
        stopping=pb.StoppingCriteria(max_new_tokens=12, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=30)
    assert r.completion_tokens == 12
    return list(r.token_ids)


def req(**kw) -> pb.GenerateRequest:
    kw.setdefault("prompt", "hello")
    return pb.GenerateRequest(**kw)


BAD = [
    ("empty input", pb.GenerateRequest(), INVALID, "input is empty"),
    ("empty prompt", req(prompt=""), INVALID, "input.prompt is empty"),
    ("negative temperature", req(sampling=pb.SamplingParameters(temperature=-0.5)), INVALID,
     "sampling.temperature must be in [0, 100]"),
    ("absurd temperature", req(sampling=pb.SamplingParameters(temperature=1e9)), INVALID,
     "sampling.temperature"),
    ("top_p above 1", req(sampling=pb.SamplingParameters(top_p=1.5)), INVALID,
     "sampling.top_p must be in (0, 1]"),
    ("negative top_p", req(sampling=pb.SamplingParameters(top_p=-0.1)), INVALID,
     "sampling.top_p"),
    ("top_k above vocabulary", req(sampling=pb.SamplingParameters(top_k=10**6)), INVALID,
     "greater than the vocabulary size 49152"),
    ("negative repetition penalty",
     req(sampling=pb.SamplingParameters(repetition_penalty=-1)), INVALID,
     "sampling.repetition_penalty"),
    ("presence penalty above 2", req(sampling=pb.SamplingParameters(presence_penalty=2.5)),
     INVALID, "sampling.presence_penalty must be in [-2, 2]"),
    ("frequency penalty below -2",
     req(sampling=pb.SamplingParameters(frequency_penalty=-3)), INVALID,
     "sampling.frequency_penalty must be in [-2, 2]"),
    ("too many top logprobs", req(response=pb.ResponseOptions(top_logprobs=21)), INVALID,
     "response.top_logprobs 21 is greater than the limit 20"),
    ("max_new_tokens over the cap", req(stopping=pb.StoppingCriteria(max_new_tokens=129)),
     INVALID, "stopping.max_new_tokens 129 is greater than the limit 128"),
    ("too many stop sequences",
     req(stopping=pb.StoppingCriteria(stop_sequences=["a", "b", "c", "d", "e"])), INVALID,
     "has 5 entries; the limit is 4"),
    ("stop sequence too long", req(stopping=pb.StoppingCriteria(stop_sequences=["x" * 500])),
     INVALID, "has 500 characters; the limit is 128"),
    ("empty stop sequence", req(stopping=pb.StoppingCriteria(stop_sequences=[""])), INVALID,
     "stopping.stop_sequences[0] is empty"),
    ("token id outside vocabulary",
     pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 49152])), INVALID,
     "contains 49152, outside the vocabulary [0, 49152)"),
    ("prompt longer than the context",
     pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300)), INVALID,
     "more than the context limit 256"),
    ("bad chat role",
     pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot",
                                                                          content="x")])),
     INVALID, "input.messages[0].role 'robot'"),
    ("unknown adapter", req(adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND,
     "adapter 'no-such-adapter' is not loaded"),
]


def test_health_serving_and_reflection(stubs):
    _, _, channel = stubs
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "switchboard.v1.TextGeneration", "switchboard.v1.AdapterAdmin"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"switchboard.v1.TextGeneration", "switchboard.v1.AdapterAdmin"} <= names


@pytest.mark.parametrize("name,request_msg,code,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_status_and_server_keeps_serving(stubs, name, request_msg, code,
                                                        message):
    stub = stubs[0]
    before = good(stub)
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r,
                                                                            timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_msg, timeout=30)
        assert err.value.code() == code, err.value.details()
        assert message in err.value.details()
    assert good(stub) == before


def test_same_seed_same_sample_and_greedy_default(stubs):
    stub = stubs[0]

    def sample(seed):
        return list(stub.Generate(req(
            prompt="Once upon a time",
            sampling=pb.SamplingParameters(temperature=0.9, top_p=0.95, top_k=50, seed=seed,
                                           repetition_penalty=1.1),
            stopping=pb.StoppingCriteria(max_new_tokens=20, ignore_eos=True),
            response=pb.ResponseOptions(token_ids=True)), timeout=30).token_ids)

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and len(a) == 20
    assert a != c


def test_stop_sequence_cuts_output_and_stream_matches(stubs):
    stub = stubs[0]
    base = stub.Generate(req(prompt="The weather today", stopping=pb.StoppingCriteria(
        max_new_tokens=30, ignore_eos=True)), timeout=30).text
    assert len(base) > 10
    stop = base[5:9]
    r = stub.Generate(req(prompt="The weather today", stopping=pb.StoppingCriteria(
        max_new_tokens=30, ignore_eos=True, stop_sequences=[stop])), timeout=30)
    assert r.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert r.text == base[: base.index(stop)]
    chunks = list(stub.GenerateStream(req(prompt="The weather today",
                                          stopping=pb.StoppingCriteria(
                                              max_new_tokens=30, ignore_eos=True,
                                              stop_sequences=[stop])), timeout=30))
    assert "".join(c.text for c in chunks) == r.text
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert chunks[-1].completion_tokens == r.completion_tokens


def test_stream_deltas_concatenate_to_unary_text(stubs):
    stub = stubs[0]
    # Random weights emit arbitrary byte-level tokens, including partial UTF-8 sequences.
    msg = req(token_ids=pb.TokenIds(ids=[30000, 45000, 12, 9]),
              stopping=pb.StoppingCriteria(max_new_tokens=60, ignore_eos=True))
    unary = stub.Generate(msg, timeout=30)
    chunks = list(stub.GenerateStream(msg, timeout=30))
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].completion_tokens == unary.completion_tokens == 60


def test_adapter_admin_lifecycle(stubs):
    stub, admin, _ = stubs
    listed = {a.adapter_id: a for a in admin.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert "tenant-a" in listed and listed["tenant-a"].rank == 8
    assert listed["tenant-a"].method == "lora"
    with pytest.raises(grpc.RpcError) as err:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="evil", path="../../etc"))
    assert err.value.code() == INVALID and "outside the adapter root" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="wrong",
                                                path="incoming/wrong-base"))
    assert err.value.code() == INVALID and "different base" in err.value.details()
    before = good(stub)
    r = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="tenant-b", path="incoming/tenant-b"))
    assert r.adapter.version == "1" and not r.replaced
    out_b = good(stub, "tenant-b")
    assert out_b != before
    r = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="tenant-b", path="incoming/tenant-b"))
    assert r.adapter.version == "2" and r.replaced
    resp = stub.Generate(req(adapter_id="tenant-b"), timeout=30)
    assert resp.adapter_version == "2"
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="tenant-b"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req(adapter_id="tenant-b"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert good(stub) == before


def test_deadline_exceeded(stubs):
    stub = stubs[0]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req(prompt="count", stopping=pb.StoppingCriteria(
            max_new_tokens=128, ignore_eos=True)), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    good(stub)


def test_tokenize_and_model_info(stubs):
    stub = stubs[0]
    tok = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"))
    assert len(tok.token_ids) == len(tok.tokens) >= 2
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == 49152 and info.max_context_tokens == 256
    assert {m.part for m in info.memory} >= {"base_model", "kv_cache"}


def test_concurrent_requests_all_answered(stubs):
    stub = stubs[0]
    expected = good(stub)
    results = []
    threads = [threading.Thread(target=lambda: results.append(good(stub))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 12
