"""asyncio Switchboard client: the API of `clients.client.SwitchboardClient`, awaitable.

    async with AsyncSwitchboardClient("127.0.0.1:50051") as client:
        result = await client.generate("Hello", max_new_tokens=16)
        async for chunk in client.generate_stream("Hello", max_new_tokens=16):
            print(chunk.text, end="")

Create it inside the event loop that uses it (gRPC aio channels belong to one loop).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from . import convert
from .client import HEALTH_STATUS, ClientCore
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
from .routing import DEFAULT_TARGET, is_retryable


class _Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.generation = pb_grpc.TextGenerationStub(channel)
        self.admin = pb_grpc.AdapterAdminStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


class AsyncSwitchboardClient:
    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        self._core = ClientCore(target, **kwargs)
        self._stubs: dict[str, _Stubs] = {}

    @property
    def endpoints(self) -> list[str]:
        return list(self._core.endpoints)

    def _stub(self, endpoint: str) -> _Stubs:
        stubs = self._stubs.get(endpoint)
        if stubs is None:  # single event loop: no lock needed
            opts = self._core.channel_options
            if self._core.tls is not None:
                channel = grpc.aio.secure_channel(
                    endpoint, self._core.tls.credentials(), options=opts
                )
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=opts)
            stubs = self._stubs[endpoint] = _Stubs(channel)
        return stubs

    async def close(self) -> None:
        stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            await s.channel.close()

    async def __aenter__(self) -> AsyncSwitchboardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
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
        deadline = self._core.deadline(timeout)
        metadata = self._core.metadata(key, request_id)
        last: SwitchboardError | None = None
        for endpoint in endpoints or self._core.attempts(key):
            if last is not None and deadline.expired():
                break
            fn = getattr(getattr(self._stub(endpoint), service), method)
            try:
                with self._core.router.using(endpoint):
                    response = await fn(request, metadata=metadata, timeout=deadline.remaining())
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

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[StreamChunk]:
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
                    async for msg in call:
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
                call.cancel()
        assert last is not None
        raise last

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> GenerateResult:
        request = convert.generate_request(prompt, **params)
        response, endpoint = await self._unary(
            "generation", "Generate", request, key=request.adapter_id, timeout=timeout,
            request_id=request.request_id,
        )
        return convert.generate_result(response, endpoint)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[StreamChunk]:
        """`async for chunk in client.generate_stream(...)`; breaking out cancels the call."""
        request = convert.generate_request(prompt, **params)
        return self._stream(request, timeout)

    async def chat(self, messages: Sequence[Message], **params: Any) -> GenerateResult:
        return await self.generate(messages=messages, **params)

    def chat_stream(
        self, messages: Sequence[Message], **params: Any
    ) -> AsyncIterator[StreamChunk]:
        return self.generate_stream(messages=messages, **params)

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        request = convert.tokenize_request(prompt, messages=messages)
        response, _ = await self._unary(
            "generation", "Tokenize", request, key="", timeout=timeout
        )
        return convert.tokenize_result(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response, _ = await self._unary(
            "generation", "GetModelInfo", pb.GetModelInfoRequest(), key="", timeout=timeout
        )
        return convert.model_info(response)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        response, _ = await self._unary(
            "admin", "ListAdapters", pb.ListAdaptersRequest(), key="", timeout=timeout
        )
        return [convert.adapter_info(a) for a in response.adapters]

    async def load_adapter(
        self, adapter_id: str, path: str = "", *, timeout: float | None = None
    ) -> LoadAdapterResult:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path)
        results = await self._broadcast("LoadAdapter", request, adapter_id, timeout)
        return convert.load_adapter_result(results[0])

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        results = await self._broadcast("UnloadAdapter", request, adapter_id, timeout)
        return any(r.unloaded for r in results)

    async def _broadcast(
        self, method: str, request: Any, adapter_id: str, timeout: float | None
    ) -> list[Any]:
        responses: list[Any] = []
        last: SwitchboardError | None = None
        for endpoint in self._core.router.order(adapter_id):
            try:
                response, _ = await self._unary(
                    "admin", method, request, key=adapter_id, timeout=timeout,
                    endpoints=[endpoint],
                )
            except Unavailable as err:
                last = err
                continue
            responses.append(response)
        if not responses:
            assert last is not None
            raise last
        return responses

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        response, _ = await self._unary(
            "health", "Check", health_pb2.HealthCheckRequest(service=service), key="",
            timeout=timeout,
        )
        return HEALTH_STATUS.get(response.status, str(response.status))
