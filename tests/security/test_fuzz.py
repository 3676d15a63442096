"""Property-based fuzzing through the real gRPC stack: every field of GenerateRequest and
TokenizeRequest, and malformed bytes on a raw channel. Every answer is a defined status
code (never INTERNAL or UNKNOWN), and a good request is answered correctly afterwards."""

from __future__ import annotations

import socket

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

C = grpc.StatusCode
DEFINED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED,
           C.FAILED_PRECONDITION}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
long_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1000,
                    max_size=5000)
u32 = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 1.0, -1.0]))
adapter_ids = st.one_of(st.sampled_from(["", "tenant-a", "shared", "corrupt", "nope",
                                         "../etc", "tenant-*"]), text)
messages = st.builds(
    lambda ms, gen: pb.ChatMessages(messages=ms, add_generation_prompt=gen),
    st.lists(st.builds(pb.ChatMessage,
                       role=st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]),
                                      text),
                       content=text), max_size=4),
    st.booleans())


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=draw(text), adapter_id=draw(adapter_ids))
    kind = draw(st.sampled_from(["prompt", "messages", "token_ids", "none"]))
    if kind == "prompt":
        msg.prompt = draw(st.one_of(text, long_text))
    elif kind == "messages":
        msg.messages.CopyFrom(draw(messages))
    elif kind == "token_ids":
        msg.token_ids.ids.extend(draw(st.lists(u32, max_size=40)))
    s = msg.sampling
    s.temperature, s.top_p = draw(floats), draw(floats)
    s.top_k, s.repetition_penalty = draw(u32), draw(floats)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    msg.stopping.max_new_tokens = draw(u32)
    msg.stopping.stop_sequences.extend(draw(st.lists(text, max_size=10)))
    msg.stopping.ignore_eos = draw(st.booleans())
    msg.response.token_ids, msg.response.logprobs = draw(st.booleans()), draw(st.booleans())
    return msg


@pytest.fixture(scope="module")
def stub(fault_server):
    with grpc.insecure_channel(fault_server.target) as ch:
        yield pb_grpc.TextGenerationStub(ch)


@pytest.fixture(scope="module")
def reference(stub) -> list[int]:
    return good(stub)


def good(stub) -> list[int]:
    r = stub.Generate(pb.GenerateRequest(
        prompt="The weather today", stopping=pb.StoppingCriteria(max_new_tokens=8,
                                                                 ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=60)
    assert r.completion_tokens == 8
    return list(r.token_ids)


def status(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


@SETTINGS
@given(msg=generate_requests(), stream=st.booleans())
def test_fuzz_generate(stub, msg, stream):
    if stream:
        code, details = status(lambda: list(stub.GenerateStream(msg, timeout=60)))
    else:
        code, details = status(lambda: stub.Generate(msg, timeout=60))
    assert code in DEFINED, (code, details, msg)


@SETTINGS
@given(msg=st.one_of(
    st.builds(pb.TokenizeRequest, prompt=text),
    st.builds(lambda m: pb.TokenizeRequest(messages=m), messages)))
def test_fuzz_tokenize(stub, msg):
    code, details = status(lambda: stub.Tokenize(msg, timeout=30))
    assert code in DEFINED, (code, details, msg)


METHODS = ["/switchboard.v1.TextGeneration/Generate",
           "/switchboard.v1.TextGeneration/Tokenize",
           "/switchboard.v1.TextGeneration/GetModelInfo",
           "/switchboard.v1.AdapterAdmin/LoadAdapter"]


@SETTINGS
@given(data=st.binary(max_size=512), method=st.sampled_from(METHODS))
def test_fuzz_raw_bytes(fault_server, data, method):
    with grpc.insecure_channel(fault_server.target) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        code, details = status(lambda: call(data, timeout=30))
        stream = ch.unary_stream("/switchboard.v1.TextGeneration/GenerateStream",
                                 request_serializer=None, response_deserializer=None)
        scode, sdetails = status(lambda: list(stream(data, timeout=30)))
    # AdapterAdmin may accept bytes that parse (it is enabled on this server).
    assert code in DEFINED, (code, details, data)
    assert scode in DEFINED, (scode, sdetails, data)


def test_garbage_on_the_socket_and_unknown_methods(fault_server, stub, reference):
    host, port = fault_server.target.rsplit(":", 1)
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)) * 4, bytes(1000)):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            try:
                sock.recv(4096)
            except OSError:
                pass
    with grpc.insecure_channel(fault_server.target) as ch:
        call = ch.unary_unary("/switchboard.v1.TextGeneration/NoSuchMethod",
                              request_serializer=None, response_deserializer=None)
        assert status(lambda: call(b"", timeout=10))[0] == C.UNIMPLEMENTED
    assert good(stub) == reference


def test_server_still_answers_correctly_after_fuzzing(stub, reference):
    assert good(stub) == reference
