"""gRPC health gives the answer HTTP /health gives (server/api/health.py): NOT_SERVING
until the server is ready, SERVING while the engine's own health() (the Engine protocol)
is ok, NOT_SERVING once the engine stops or the drain starts. A real server process on
loopback, and in process a real PyTorch engine behind a real gRPC server."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import ServerProcess

from server.api.health import GrpcHealthReporter, ServerHealth
from server.config import EngineConfig
from server.engine.engine import Engine as PyTorchEngine
from server.security.interceptor import DrainGate

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "switchboard.v1.TextGeneration", "switchboard.v1.AdapterAdmin")


def _http_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_server_serves_once_ready_and_watchers_see_the_drain(tiny_model, tmp_path):
    server = ServerProcess(["--base-model", tiny_model, "--adapter-dir", tmp_path,
                            "--kv-cache-memory", "8MiB", "--enable-admin", "--http-port", "0",
                            "--grace-period", "30"])
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in SERVICES:  # "ready" is printed once the health says SERVING
                assert stub.Check(health_pb2.HealthCheckRequest(service=name),
                                  timeout=10).status == SERVING, name
            assert _http_health(server.http_port) == (200, {"status": "ok"})
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert next(watch).status == SERVING
            server.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING  # pushed to the watcher at once
            with pytest.raises(grpc.RpcError):  # then the server stops
                next(watch)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


@pytest.fixture
def engine(tiny_model, tmp_path):
    eng = PyTorchEngine(tiny_model, tmp_path, EngineConfig(
        device="cpu", dtype="float32", max_batch_size=2, max_tokens_per_step=32,
        max_seq_len=128, kv_cache_bytes=16 << 20, max_active_adapters=2, max_lora_rank=8,
        threads=1, cpu_kernels="torch"))
    yield eng
    eng.stop()


@pytest.fixture
def grpc_health():
    """A gRPC server on loopback serving one HealthServicer -> (servicer, stub)."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield servicer, health_pb2_grpc.HealthStub(ch)
    server.stop(0)


def _status(stub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_grpc_health_follows_the_engine(engine, grpc_health):
    servicer, stub = grpc_health
    gate = DrainGate()
    state = ServerHealth(engine, gate)
    reporter = GrpcHealthReporter(state, servicer, ["switchboard.v1.TextGeneration"])
    assert reporter.update() == NOT_SERVING and state.check() == ("starting", "")
    engine.start()
    assert reporter.update() == NOT_SERVING  # started, but not marked ready (warm-up)
    state.mark_ready()
    assert reporter.update() == SERVING and state.check() == ("ok", "")
    assert _status(stub) == SERVING and _status(stub, "switchboard.v1.TextGeneration") == SERVING
    engine.stop()  # the engine's own health: its thread is gone
    assert state.check() == ("unhealthy", "the pytorch engine is stopped")
    assert reporter.update() == NOT_SERVING
    assert _status(stub) == NOT_SERVING
    assert _status(stub, "switchboard.v1.TextGeneration") == NOT_SERVING


def test_the_watcher_thread_sees_the_engine_stop(engine, grpc_health):
    """Without any call to update: the reporter's thread reads the engine's health."""
    servicer, stub = grpc_health
    state = ServerHealth(engine, DrainGate())
    reporter = GrpcHealthReporter(state, servicer, [], interval=0.05)
    engine.start()
    state.mark_ready()
    reporter.start()
    try:
        assert _status(stub) == SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        engine.stop()
        assert next(watch).status == NOT_SERVING
        watch.cancel()
    finally:
        reporter.stop()


def test_draining_wins_over_a_healthy_engine(engine, grpc_health):
    servicer, stub = grpc_health
    gate = DrainGate()
    state = ServerHealth(engine, gate)
    reporter = GrpcHealthReporter(state, servicer, [])
    engine.start()
    state.mark_ready()
    assert reporter.update() == SERVING
    assert gate.drain(1.0)  # nothing in flight: drained at once, new calls refused
    assert engine.health().ok and state.check() == ("draining", "")
    assert reporter.update() == NOT_SERVING
    assert _status(stub) == NOT_SERVING
