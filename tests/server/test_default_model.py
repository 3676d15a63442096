"""End to end with the real default model (SmolLM2-135M-Instruct) over gRPC."""

from __future__ import annotations

import grpc
import pytest
from support import ServerProcess

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    server = ServerProcess(["--adapter-dir", str(tmp_path_factory.mktemp("adapters")),
                            "--max-seq-len", "512", "--kv-cache-memory", "256MiB"])
    yield pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
    server.stop()


def chat(text: str, max_new_tokens: int = 32) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens),
        response=pb.ResponseOptions(token_ids=True),
    )


def test_capital_of_france_unary_and_streaming(stub):
    r = stub.Generate(chat("What is the capital of France?"), timeout=120)
    assert r.text == "The capital of France is Paris."
    assert r.finish_reason == pb.FINISH_REASON_EOS
    chunks = list(stub.GenerateStream(chat("What is the capital of France?"), timeout=120))
    assert "".join(c.text for c in chunks) == r.text
    assert [t for c in chunks for t in c.token_ids] == list(r.token_ids)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS
    assert chunks[-1].completion_tokens == r.completion_tokens


def test_multibyte_output_streams_exactly(stub):
    msg = chat("Repeat exactly, with nothing else: 北京是中国的首都 🙂🎉", max_new_tokens=40)
    unary = stub.Generate(msg, timeout=120)
    assert any(ord(ch) > 0x2E80 for ch in unary.text), unary.text  # CJK or emoji came out
    chunks = list(stub.GenerateStream(msg, timeout=120))
    assert "".join(c.text for c in chunks) == unary.text
    assert all("\ufffd" not in c.text for c in chunks)
