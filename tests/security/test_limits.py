"""Every request limit reported with its value; a full queue answered RESOURCE_EXHAUSTED
with a retry hint; deadlines and cancellation (queued or decoding) freeing capacity.

The server has one KV-cache row and a queue of one, so that "capacity" is observable: a
request can only run when the previous one has let go of the row."""

from __future__ import annotations

import time

import grpc
import pytest
from security_support import code_of, rpc_error, small
from support import wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG = 1000  # tokens: seconds of work for the single row


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from support import ServerProcess

    s = ServerProcess(["--base-model", str(tiny_model),
                       "--adapter-dir", str(tmp_path_factory.mktemp("none")),
                       "--max-seq-len", "1100", "--kv-cache-memory", "8MiB",
                       "--max-batch-size", "1", "--max-queue", "1",
                       "--max-new-tokens", str(LONG), "--max-prompt-tokens", "16",
                       "--max-prompt-chars", "2000", "--max-stop-sequences", "2",
                       "--max-stop-sequence-chars", "8", "--max-message-size", "64KiB",
                       "--retry-after-ms", "250"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.TextGenerationStub(ch)


@pytest.fixture(scope="module")
def long_seconds(stub) -> float:
    """How long LONG tokens take on this machine: a row kept by a request that ended early
    would delay the next request by most of this."""
    t0 = time.monotonic()
    assert stub.Generate(long_request(), timeout=120).completion_tokens == LONG
    return time.monotonic() - t0


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="count", stopping=pb.StoppingCriteria(
        max_new_tokens=LONG, ignore_eos=True))


def quick(stub) -> float:
    t0 = time.monotonic()
    r = stub.Generate(small(n=4), timeout=60)
    assert r.completion_tokens == 4
    return time.monotonic() - t0


LIMITS = [
    ("prompt tokens", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 17)),
     "input has 17 tokens; the limit is 16"),
    ("prompt characters", pb.GenerateRequest(prompt="x" * 2001),
     "input.prompt has 2001 characters; the limit is 2000"),
    ("new tokens", small(n=LONG + 1), f"max_new_tokens {LONG + 1} is greater than the limit"),
    ("stop sequences", pb.GenerateRequest(
        prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["a", "b", "c"])),
     "stop_sequences has 3 entries; the limit is 2"),
    ("stop sequence length", pb.GenerateRequest(
        prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["123456789"])),
     "stop_sequences[0] has 9 characters; the limit is 8"),
]


@pytest.mark.parametrize("name,msg,text", LIMITS, ids=[x[0] for x in LIMITS])
def test_each_limit_is_reported_with_its_value(stub, name, msg, text):
    err = rpc_error(stub.Generate, msg, timeout=30)
    assert err.code() == INVALID and text in err.details(), err.details()


def test_message_size_limit(stub):
    err = rpc_error(stub.Generate, pb.GenerateRequest(prompt="y" * 70_000), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in err.details(), err.details()
    quick(stub)


def test_full_queue_has_retry_hint_and_deadlines_free_the_queue(stub):
    running = stub.GenerateStream(long_request(), timeout=120)
    next(running)  # holds the only row
    # A queued request past its deadline leaves the queue...
    t0 = time.monotonic()
    assert code_of(stub.Generate, small(), timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    # ... so the queue has room again for one waiting request (the server may see the
    # deadline pass a moment after the client does: a refusal in that moment is retried),
    def accepted():
        call = stub.Generate.future(small(n=3), timeout=120)
        time.sleep(0.5)  # a refusal comes back at once; an accepted request waits for the row
        if call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        return call

    waiting = wait_for(accepted, timeout=10)

    def refused():
        try:
            stub.Generate(small(), timeout=1)
        except grpc.RpcError as e:
            return e if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        return None

    # ... and the next one finds the queue full.
    err = wait_for(refused, timeout=20)
    assert "queue is full" in err.details() and "limit 1" in err.details()
    assert ("retry-after-ms", "250") in tuple(err.trailing_metadata())
    running.cancel()
    assert waiting.result().completion_tokens == 3
    quick(stub)


def test_deadline_while_decoding_frees_the_row(stub, long_seconds):
    baseline = quick(stub)
    t0 = time.monotonic()
    assert code_of(stub.Generate, long_request(), timeout=0.5) == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    # Had the expired request kept its row, this would wait for the rest of LONG tokens.
    assert quick(stub) < baseline + long_seconds / 4


def test_cancelled_stream_frees_the_row(stub, long_seconds):
    baseline = quick(stub)
    call = stub.GenerateStream(long_request(), timeout=120)
    next(call)
    call.cancel()
    assert quick(stub) < baseline + long_seconds / 4


def test_long_request_really_is_long(stub, long_seconds):
    """Guards the two tests above: the slack they allow (a quarter of LONG tokens' time) is
    clearly less than what a kept row costs after a 0.5 s deadline (LONG tokens' time less
    0.5 s), and much more than a quick request takes."""
    assert long_seconds / 4 < long_seconds - 0.5 - long_seconds / 4
    assert long_seconds / 4 > 3 * quick(stub)
