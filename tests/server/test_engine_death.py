"""The engine thread dies in a real server process: the health turns NOT_SERVING (gRPC
and HTTP), the stream it was serving ends with UNAVAILABLE and the reason instead of
hanging, new requests are refused with UNAVAILABLE, and the process keeps answering its
health, metrics and signals (server/engine/lifecycle.py, RequestLoop._die).

No input a client can send kills the engine thread (a failing step is isolated to its
rows), so the fault is injected, in this test only: the server process is started with a
directory first on PYTHONPATH whose sitecustomize.py wraps the step loop's
`_run_isolated` to raise once the victim request holds three tokens. Nothing in the
server reads a switch for it."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import REPO, ServerProcess, http_call, metric, wait_for

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
VICTIM = "engine-death-victim"
TOKENS_BEFORE_DEATH = 3
ARMED = "test fault injection armed"

FAULT = f'''"""Test-only (tests/server/test_engine_death.py): the engine thread raises out of its
step loop at the step after request {VICTIM!r} got {TOKENS_BEFORE_DEATH} tokens."""
from server.engine.lifecycle import RequestLoop

_run_isolated = RequestLoop._run_isolated


def _dying_run_isolated(self, plan):
    if any(e.seq.request_id == {VICTIM!r} and len(e.seq.output_ids) >= {TOKENS_BEFORE_DEATH}
           for e in plan.entries):
        raise RuntimeError("injected fault: the step loop raised")
    _run_isolated(self, plan)


RequestLoop._run_isolated = _dying_run_isolated
print("switchboard: {ARMED}", flush=True)
'''


@pytest.fixture
def server(tiny_model, tmp_path, monkeypatch):
    hook = tmp_path / "fault"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)
    path = [str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    s = ServerProcess(["--base-model", tiny_model, "--adapter-dir", tmp_path / "adapters",
                       "--kv-cache-memory", "8MiB", "--enable-admin", "--http-port", "0",
                       "--metrics-port", "0", "--grace-period", "5"])
    yield s
    s.stop()


def _status(health, service: str = "") -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _http(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    status, _, text = http_call(server, path, body, timeout=30)
    return status, json.loads(text)


def _request(request_id: str = "", tokens: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt="count", stopping=pb.StoppingCriteria(
        max_new_tokens=tokens, ignore_eos=True))


def test_a_dead_engine_thread_fails_requests_and_turns_the_health_not_serving(server,
                                                                              tiny_model):
    assert any(ARMED in line for line in server.lines), "the fault hook was not loaded"
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        assert _status(health) == SERVING
        assert stub.Generate(_request(), timeout=30).completion_tokens == 4  # serving

        stream = stub.GenerateStream(_request(VICTIM, tokens=200), timeout=30)
        received = []
        with pytest.raises(grpc.RpcError) as died:  # not a hang until the deadline
            for chunk in stream:
                received.append(chunk)
        assert len(received) == TOKENS_BEFORE_DEATH
        assert died.value.code() == grpc.StatusCode.UNAVAILABLE, died.value.details()
        assert "engine thread died" in died.value.details()
        assert "injected fault" in died.value.details()

        # gRPC health: NOT_SERVING for the server and each service (the reporter polls)
        wait_for(lambda: _status(health) == NOT_SERVING, timeout=15)
        for name in ("switchboard.v1.TextGeneration", "switchboard.v1.AdapterAdmin"):
            assert _status(health, name) == NOT_SERVING, name
        status, body = _http(server, "/health")
        assert status == 503 and body["status"] == "unhealthy"
        assert "engine thread died" in body["detail"]

        with pytest.raises(grpc.RpcError) as refused:  # new requests: refused at once
            stub.Generate(_request(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine thread died" in refused.value.details()
        status, body = _http(server, "/v1/completions",
                             {"model": str(tiny_model), "prompt": "count", "max_tokens": 2})
        assert status == 503 and "engine thread died" in body["error"]["message"]

        # the rest of the process still answers: the metrics (the memory gauge reads the
        # engine's memory, not its thread) and calls that need no engine step
        assert metric(server.metrics_port, "switchboard_requests_total",
                      code="UNAVAILABLE") == 3
        assert metric(server.metrics_port, "switchboard_memory_bytes", part="base_model") > 0
        assert stub.Tokenize(pb.TokenizeRequest(prompt="count"), timeout=10).token_ids
        assert server.proc.poll() is None

    server.proc.send_signal(signal.SIGTERM)  # and it still drains and exits cleanly
    assert server.proc.wait(30) == 0
