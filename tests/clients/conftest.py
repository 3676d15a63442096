"""A stand-in replica for client tests that need a live gRPC peer.

It speaks the switchboard.v1 API over real loopback gRPC but does no inference: it
echoes, records the metadata it received, and raises the status codes the tests ask for.
It exists to exercise client-side behaviour the real server cannot be asked to show on
demand (a replica dying, RESOURCE_EXHAUSTED with a retry hint). Generation semantics are
tested against the real server (`switchboard serve`) elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc


@dataclass
class Seen:
    """What a replica received: (method, adapter_id, metadata dict) per call."""

    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, adapter_id: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, adapter_id, dict(context.invocation_metadata())))

    def adapters(self, method: str = "Generate") -> set[str]:
        with self.lock:
            return {a for m, a, _ in self.calls if m == method}


def _fail_for(adapter_id: str, context: grpc.ServicerContext) -> None:
    if adapter_id == "missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not loaded")
    if adapter_id == "busy":
        context.set_trailing_metadata((("retry-after-ms", "1500"),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full (64 of 64 waiting)")


class StandInServicer(pb_grpc.TextGenerationServicer, pb_grpc.AdapterAdminServicer):
    def __init__(self, name: str, seen: Seen, token_delay: float = 0.0) -> None:
        self.name = name
        self.seen = seen
        self.token_delay = token_delay
        self.adapters: dict[str, int] = {}

    def _text(self, request: pb.GenerateRequest) -> str:
        which = request.WhichOneof("input")
        if which == "messages":
            return request.messages.messages[-1].content
        if which == "token_ids":
            return " ".join(str(t) for t in request.token_ids.ids)
        return request.prompt

    def Generate(self, request, context):
        self.seen.add("Generate", request.adapter_id, context)
        _fail_for(request.adapter_id, context)
        if request.sampling.temperature < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"sampling.temperature {request.sampling.temperature} must be >= 0")
        n = request.stopping.max_new_tokens or 4
        return pb.GenerateResponse(
            request_id=request.request_id, text=f"{self.name}:{self._text(request)}",
            token_ids=list(range(n)) if request.response.token_ids else [],
            finish_reason=pb.FINISH_REASON_LENGTH, prompt_tokens=3, completion_tokens=n,
            adapter_id=request.adapter_id, adapter_version="1",
            timings=pb.Timings(queue_seconds=0.001, time_to_first_token_seconds=0.002,
                               total_seconds=0.003),
        )

    def GenerateStream(self, request, context) -> Iterator[pb.GenerateStreamResponse]:
        self.seen.add("GenerateStream", request.adapter_id, context)
        _fail_for(request.adapter_id, context)
        n = request.stopping.max_new_tokens or 4
        for i in range(n):
            if self.token_delay:
                time.sleep(self.token_delay)
            if not context.is_active():
                return
            yield pb.GenerateStreamResponse(request_id=request.request_id, text=f"t{i} ",
                                            token_ids=[i], adapter_id=request.adapter_id)
        yield pb.GenerateStreamResponse(
            request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH,
            prompt_tokens=3, completion_tokens=n, adapter_id=request.adapter_id,
            adapter_version="1", timings=pb.Timings(total_seconds=0.01),
        )

    def Tokenize(self, request, context):
        self.seen.add("Tokenize", "", context)
        words = request.prompt.split()
        return pb.TokenizeResponse(token_ids=list(range(len(words))), tokens=words)

    def GetModelInfo(self, request, context):
        self.seen.add("GetModelInfo", "", context)
        return pb.GetModelInfoResponse(model_id=f"stand-in/{self.name}", vocab_size=49152,
                                       memory=[pb.MemoryUsage(part="base_model", bytes=10)])

    def ListAdapters(self, request, context):
        self.seen.add("ListAdapters", "", context)
        return pb.ListAdaptersResponse(adapters=[
            pb.AdapterInfo(adapter_id=a, method="lora", version=str(v), rank=8,
                           tier=pb.ADAPTER_TIER_HOST, slot=-1)
            for a, v in sorted(self.adapters.items())
        ])

    def LoadAdapter(self, request, context):
        self.seen.add("LoadAdapter", request.adapter_id, context)
        _fail_for(request.adapter_id, context)
        replaced = request.adapter_id in self.adapters
        self.adapters[request.adapter_id] = self.adapters.get(request.adapter_id, 0) + 1
        return pb.LoadAdapterResponse(
            adapter=pb.AdapterInfo(adapter_id=request.adapter_id, method="lora",
                                   version=str(self.adapters[request.adapter_id]), rank=8),
            replaced=replaced,
        )

    def UnloadAdapter(self, request, context):
        self.seen.add("UnloadAdapter", request.adapter_id, context)
        return pb.UnloadAdapterResponse(unloaded=self.adapters.pop(request.adapter_id, 0) > 0)


@dataclass
class Replica:
    name: str
    address: str
    server: grpc.Server
    servicer: StandInServicer
    seen: Seen

    def kill(self) -> None:
        self.server.stop(grace=None).wait()


def start_replica(name: str, token_delay: float = 0.0) -> Replica:
    seen = Seen()
    servicer = StandInServicer(name, seen, token_delay)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_TextGenerationServicer_to_server(servicer, server)
    pb_grpc.add_AdapterAdminServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return Replica(name, f"127.0.0.1:{port}", server, servicer, seen)


@pytest.fixture
def make_replica() -> Iterator:
    """Factory for extra replicas (name, token_delay); all are stopped at teardown."""
    started: list[Replica] = []

    def make(name: str, token_delay: float = 0.0) -> Replica:
        started.append(start_replica(name, token_delay))
        return started[-1]

    yield make
    for r in started:
        r.kill()


@pytest.fixture
def replica() -> Iterator[Replica]:
    r = start_replica("r0")
    yield r
    r.kill()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    rs = [start_replica(f"r{i}") for i in range(3)]
    yield rs
    for r in rs:
        r.kill()
