"""Every request limit reported with its value; a full queue answered RESOURCE_EXHAUSTED
with a retry hint; deadlines and cancellation (queued or decoding) freeing capacity.

The server has one KV-cache row and a queue of one, so that "capacity" is observable: a
request can only run when the previous one has let go of the row. Whether a row or a queue
place is held is read from the server's own gauges (`switchboard_requests_running`,
`switchboard_requests_waiting`), and how far a stopped request got from its generated-token
counter: no assertion depends on how fast this machine decodes. LONG is sized so that no
machine finishes it within a test (tens of seconds at the tiny model's fastest); that a
stopped request really stopped early is asserted from the counter, not assumed."""

from __future__ import annotations

import grpc
import pytest
from security_support import code_of, rpc_error, small
from support import make_tiny_model, metric, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG = 30_000  # tokens for the single row: far more than any test waits for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import ServerProcess

    model = make_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_positions=LONG + 100)
    s = ServerProcess(["--base-model", str(model),
                       "--adapter-dir", str(tmp_path_factory.mktemp("none")),
                       "--max-seq-len", str(LONG + 100), "--kv-cache-memory", "32MiB",
                       "--max-batch-size", "1", "--max-queue", "1",
                       "--max-new-tokens", str(LONG), "--max-prompt-tokens", "16",
                       "--max-prompt-chars", "2000", "--max-stop-sequences", "2",
                       "--max-stop-sequence-chars", "8", "--max-message-size", "64KiB",
                       "--retry-after-ms", "250", "--metrics-port", "0"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.TextGenerationStub(ch)


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="count", stopping=pb.StoppingCriteria(
        max_new_tokens=LONG, ignore_eos=True))


def quick(stub) -> None:
    assert stub.Generate(small(n=4), timeout=60).completion_tokens == 4


def gauge(server, which: str) -> float:
    return metric(server.metrics_port, f"switchboard_requests_{which}")


def idle(server) -> None:
    """Wait until the server reports no running and no waiting request."""
    wait_for(lambda: gauge(server, "running") == 0 and gauge(server, "waiting") == 0,
             timeout=30)


def step_tokens(server) -> float:
    """Tokens the engine has run through its steps so far (prompts and decodes)."""
    return metric(server.metrics_port, "switchboard_step_tokens_sum")


def stopped_early(server, before: float) -> None:
    """The long request let go of its row (the server reports nothing running) long
    before LONG tokens: the engine's step counter shows it never ran them all."""
    idle(server)
    assert step_tokens(server) - before < LONG


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


def test_full_queue_has_retry_hint_and_deadlines_free_the_queue(server, stub):
    idle(server)
    running = stub.GenerateStream(long_request(), timeout=120)
    next(running)  # holds the only row
    wait_for(lambda: gauge(server, "running") == 1, timeout=30)
    # A queued request past its deadline leaves the queue...
    assert code_of(stub.Generate, small(), timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: gauge(server, "waiting") == 0, timeout=30)
    # ... so the queue has room again for one waiting request,
    waiting = stub.Generate.future(small(n=3), timeout=120)
    wait_for(lambda: gauge(server, "waiting") == 1, timeout=30)
    # ... and the next one finds the queue full, at once.
    err = rpc_error(stub.Generate, small(), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "queue is full" in err.details() and "limit 1" in err.details()
    assert ("retry-after-ms", "250") in tuple(err.trailing_metadata())
    assert gauge(server, "running") == 1, "the long request ended during the test"
    running.cancel()
    assert waiting.result().completion_tokens == 3
    quick(stub)


def test_deadline_while_decoding_frees_the_row(server, stub):
    idle(server)
    before = step_tokens(server)
    assert code_of(stub.Generate, long_request(), timeout=0.5) == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    # Had the expired request kept its row, the gauge would stay at 1 for LONG tokens.
    stopped_early(server, before)
    quick(stub)


def test_cancelled_stream_frees_the_row(server, stub):
    idle(server)
    before = step_tokens(server)
    call = stub.GenerateStream(long_request(), timeout=120)
    next(call)
    call.cancel()
    stopped_early(server, before)
    quick(stub)
