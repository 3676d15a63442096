"""Synchronous Switchboard client.

    with SwitchboardClient("127.0.0.1:50051") as client:
        print(client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=32).text)
        for chunk in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Several endpoints (a list, or "h1:p,h2:p"), or a DNS name with every replica's address
("dns:///switchboard-headless.NS.svc.cluster.local:50051", re-resolved every 30 s), turn
on client-side routing: rendezvous hashing on the adapter id picks the replica, base-model
requests rotate, UNAVAILABLE fails over to the next one (see `clients.routing`).
Failed calls raise the typed errors of `clients.errors`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from . import convert
from .channel import CHANNEL_OPTIONS, Deadline, PemSource, TlsConfig, call_metadata
from .convert import Message
from .errors import SwitchboardError, Unavailable, from_rpc_error
from .results import (
    AdapterInfo,
    GenerateResult,
    LoadAdapterResult,
    ModelInfo,
    StreamChunk,
    TokenizeResult,
)
from .routing import (
    DEFAULT_TARGET,
    DNS_SCHEME,
    Resolver,
    Router,
    is_retryable,
    parse_targets,
    resolve_addresses,
)

T = TypeVar("T")
HEALTH_STATUS = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


class ClientCore:
    """What the sync and aio clients share: endpoints, routing, credentials, metadata."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        down_seconds: float = 5.0,
        resolve_seconds: float = 30.0,
        resolve: Callable[[str, int], list[str]] = resolve_addresses,
        balance_factor: float | None = 1.5,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        resolver = None
        if isinstance(target, str) and target.strip().startswith(DNS_SCHEME):
            resolver = Resolver(target.strip(), refresh_seconds=resolve_seconds, lookup=resolve)
            resolver.endpoints()  # a name that does not resolve fails here, not later
        self.router = Router(resolver or parse_targets(target), down_seconds=down_seconds,
                             balance_factor=balance_factor)
        self.api_key = api_key
        use_tls = tls or any(x is not None for x in (root_cert, client_cert, client_key))
        if resolver is not None and server_name is None:
            server_name = resolver.host  # certificates name the service, not pod IPs
        self.tls = (
            TlsConfig.from_sources(root_cert=root_cert, client_cert=client_cert,
                                   client_key=client_key, server_name=server_name)
            if use_tls
            else None
        )
        self.timeout = timeout
        # Default: one attempt per replica (a single endpoint is never retried).
        self._max_attempts = max_attempts
        self.channel_options = CHANNEL_OPTIONS + tuple(options) + (
            self.tls.options() if self.tls else ()
        )

    @property
    def endpoints(self) -> list[str]:
        """The replicas now (a DNS target's current addresses)."""
        return self.router.endpoints

    def attempts(self, key: str) -> list[str]:
        order = self.router.order(key)
        return order[: max(1, self._max_attempts or len(order))]

    def metadata(self, adapter_id: str, request_id: str | None = None):
        return call_metadata(adapter_id, self.api_key, request_id)

    def deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)


class _Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.generation = pb_grpc.TextGenerationStub(channel)
        self.admin = pb_grpc.AdapterAdminStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


class SwitchboardClient:
    """Blocking client; thread-safe (one gRPC channel per endpoint, shared by threads)."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        self._core = ClientCore(target, **kwargs)
        self._stubs: dict[str, _Stubs] = {}
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> list[str]:
        return list(self._core.endpoints)

    # -- connection ---------------------------------------------------------------------

    def _stub(self, endpoint: str) -> _Stubs:
        stubs = self._stubs.get(endpoint)
        if stubs is None:
            with self._lock:
                stubs = self._stubs.get(endpoint)
                if stubs is None:
                    opts = self._core.channel_options
                    if self._core.tls is not None:
                        channel = grpc.secure_channel(
                            endpoint, self._core.tls.credentials(), options=opts
                        )
                    else:
                        channel = grpc.insecure_channel(endpoint, options=opts)
                    stubs = self._stubs[endpoint] = _Stubs(channel)
        return stubs

    def close(self) -> None:
        with self._lock:
            stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            s.channel.close()

    def __enter__(self) -> SwitchboardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- call plumbing ------------------------------------------------------------------

    def _unary(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        key: str,
        timeout: float | None,
        request_id: str | None = None,
        endpoints: list[str] | None = None,
    ) -> tuple[Any, str]:
        """Call on the preferred replica for `key`, failing over on UNAVAILABLE."""
        deadline = self._core.deadline(timeout)
        metadata = self._core.metadata(key, request_id)
        last: SwitchboardError | None = None
        for endpoint in endpoints or self._core.attempts(key):
            if last is not None and deadline.expired():
                break
            fn = getattr(getattr(self._stub(endpoint), service), method)
            try:
                with self._core.router.using(endpoint):
                    response = fn(request, metadata=metadata, timeout=deadline.remaining())
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, endpoint=endpoint)
                if not is_retryable(err.code, output_seen=False):
                    raise err from None
                self._core.router.mark_down(endpoint)
                last = err
                continue
            self._core.router.mark_up(endpoint)
            return response, endpoint
        assert last is not None
        raise last

    def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> Iterator[StreamChunk]:
        deadline = self._core.deadline(timeout)
        metadata = self._core.metadata(request.adapter_id, request.request_id)
        last: SwitchboardError | None = None
        for endpoint in self._core.attempts(request.adapter_id):
            if last is not None and deadline.expired():
                break
            call = self._stub(endpoint).generation.GenerateStream(
                request, metadata=metadata, timeout=deadline.remaining()
            )
            output_seen = False
            try:
                with self._core.router.using(endpoint):
                    for msg in call:
                        output_seen = True
                        yield convert.stream_chunk(msg, endpoint)
                self._core.router.mark_up(endpoint)
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, endpoint=endpoint)
                if not is_retryable(err.code, output_seen=output_seen):
                    raise err from None
                self._core.router.mark_down(endpoint)
                last = err
            finally:
                call.cancel()  # no-op when finished; stops the server when the caller quits
        assert last is not None
        raise last

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> GenerateResult:
        """One completion. Parameters: see `clients.convert.generate_request`."""
        request = convert.generate_request(prompt, **params)
        response, endpoint = self._unary(
            "generation", "Generate", request, key=request.adapter_id, timeout=timeout,
            request_id=request.request_id,
        )
        return convert.generate_result(response, endpoint)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[StreamChunk]:
        """Stream of deltas; the last chunk has `finish_reason` and the token counts.
        Closing the iterator early cancels the request on the server."""
        request = convert.generate_request(prompt, **params)  # validate before iterating
        return self._stream(request, timeout)

    def chat(self, messages: Sequence[Message], **params: Any) -> GenerateResult:
        return self.generate(messages=messages, **params)

    def chat_stream(self, messages: Sequence[Message], **params: Any) -> Iterator[StreamChunk]:
        return self.generate_stream(messages=messages, **params)

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        request = convert.tokenize_request(prompt, messages=messages)
        response, _ = self._unary("generation", "Tokenize", request, key="", timeout=timeout)
        return convert.tokenize_result(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response, _ = self._unary(
            "generation", "GetModelInfo", pb.GetModelInfoRequest(), key="", timeout=timeout
        )
        return convert.model_info(response)

    # -- adapters -----------------------------------------------------------------------

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        response, _ = self._unary(
            "admin", "ListAdapters", pb.ListAdaptersRequest(), key="", timeout=timeout
        )
        return [convert.adapter_info(a) for a in response.adapters]

    def load_adapter(
        self, adapter_id: str, path: str = "", *, timeout: float | None = None
    ) -> LoadAdapterResult:
        """Load (or replace) an adapter. With several endpoints it is loaded on every
        reachable replica, so fail-over finds it; the owner replica's answer is returned."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path)
        results = self._broadcast("LoadAdapter", request, adapter_id, timeout)
        return convert.load_adapter_result(results[0])

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        """Unload an adapter (from every reachable replica with several endpoints)."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        results = self._broadcast("UnloadAdapter", request, adapter_id, timeout)
        return any(r.unloaded for r in results)

    def _broadcast(
        self, method: str, request: Any, adapter_id: str, timeout: float | None
    ) -> list[Any]:
        responses: list[Any] = []
        last: SwitchboardError | None = None
        for endpoint in self._core.router.order(adapter_id):
            try:
                response, _ = self._unary("admin", method, request, key=adapter_id,
                                          timeout=timeout, endpoints=[endpoint])
            except Unavailable as err:
                last = err
                continue
            responses.append(response)
        if not responses:
            assert last is not None
            raise last
        return responses

    # -- health -------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Health status (SERVING, NOT_SERVING, ...) of the first reachable replica."""
        response, _ = self._unary(
            "health", "Check", health_pb2.HealthCheckRequest(service=service), key="",
            timeout=timeout,
        )
        return HEALTH_STATUS.get(response.status, str(response.status))

    def health_all(self, service: str = "", *, timeout: float | None = None) -> dict[str, str]:
        """Status of every endpoint; an unreachable one reads as its error code name."""
        out: dict[str, str] = {}
        for endpoint in self._core.endpoints:
            try:
                response, _ = self._unary(
                    "health", "Check", health_pb2.HealthCheckRequest(service=service),
                    key="", timeout=timeout, endpoints=[endpoint],
                )
                out[endpoint] = HEALTH_STATUS.get(response.status, str(response.status))
            except SwitchboardError as err:
                out[endpoint] = err.code.name
        return out
