"""The gRPC server interceptor in front of TextGeneration and AdapterAdmin.

For every call of a protected service, in this order:
1. draining (SIGTERM received): UNAVAILABLE;
2. with a keys file: no `authorization: Bearer <key>` or an unknown key: UNAUTHENTICATED;
   AdapterAdmin without the key's admin flag, or an adapter_id outside the key's patterns:
   PERMISSION_DENIED. The adapter check looks only at the key's patterns, never at the
   registry, so the answer does not reveal whether the adapter exists;
3. per-key concurrency (generation calls): RESOURCE_EXHAUSTED with `retry-after-ms`.
Bytes that do not parse as the method's request message are answered INVALID_ARGUMENT
(gRPC's own answer would be INTERNAL, which would read as a server fault).
Health and reflection pass through untouched (probes need no key).
The policy itself (`SecurityInterceptor.admit`) takes no gRPC context: the HTTP API
(server/api/http.py) calls it too, sharing the drain gate and the per-key slots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from server.metrics import ServerMetrics
from server.security.keys import ApiKey, KeyStore

log = logging.getLogger(__name__)

TEXT_GENERATION = "switchboard.v1.TextGeneration"
ADAPTER_ADMIN = "switchboard.v1.AdapterAdmin"
GENERATION_METHODS = {"Generate", "GenerateStream"}
RETRY_AFTER_KEY = "retry-after-ms"


class Denied(Exception):
    """A call the security policy refuses: its status, message and retry hint."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class DrainGate:
    """Counts calls in flight; once draining, new calls are refused."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self.draining = False

    def enter(self) -> bool:
        with self._cond:
            if self.draining:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait until none is in flight. -> whether all finished."""
        end = time.monotonic() + timeout
        with self._cond:
            self.draining = True
            while self._in_flight > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


class _Slots:
    """Concurrent generation calls per key name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}

    def take(self, name: str, limit: int) -> bool:
        with self._lock:
            n = self._used.get(name, 0)
            if n >= limit:
                return False
            self._used[name] = n + 1
            return True

    def give(self, name: str) -> None:
        with self._lock:
            n = self._used.get(name, 1) - 1
            if n <= 0:
                self._used.pop(name, None)
            else:
                self._used[name] = n


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class SecurityInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: KeyStore | None, gate: DrainGate, *,
                 max_concurrent_per_key: int = 0, retry_after_ms: int = 500,
                 metrics: ServerMetrics | None = None) -> None:
        self.keys = keys
        self.gate = gate
        # refusals are counted here (no handler runs for them); by default in a private,
        # unserved set (the app hands in the server's)
        self.metrics = metrics if metrics is not None else ServerMetrics(process_metrics=False)
        self.max_concurrent_per_key = max_concurrent_per_key  # 0 = no limit
        self.retry_after_ms = retry_after_ms
        self._slots = _Slots()

    def intercept_service(self, continuation, handler_call_details):
        _, service, method = (handler_call_details.method.split("/") + ["", ""])[:3]
        handler = continuation(handler_call_details)
        if handler is None or service not in (TEXT_GENERATION, ADAPTER_ADMIN):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)

        def admit(request, context) -> Callable[[], None]:
            return self._admit(service, method, token, request, context)

        return _wrap(handler, admit)

    def _admit(self, service: str, method: str, token: str | None, request,
               context) -> Callable[[], None]:
        try:
            return self.admit(service, method, token, getattr(request, "adapter_id", ""))
        except Denied as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(e.retry_after_ms)),))
            context.abort(e.code, e.message)

    def admit(self, service: str, method: str, token: str | None,
              adapter_id: str = "") -> Callable[[], None]:
        """The whole policy, with no gRPC context: the gRPC calls and the HTTP API both
        pass through here (one drain gate, one set of per-key slots). -> the release to
        call once the call ends; raises Denied (counted in the metrics)."""
        try:
            return self._policy(service, method, token, adapter_id)
        except Denied as e:
            self.metrics.call_rejected(service.rsplit(".", 1)[-1], e.code.name,
                                       adapter_id if method in GENERATION_METHODS else None)
            raise

    def _policy(self, service: str, method: str, token: str | None,
                adapter_id: str) -> Callable[[], None]:
        if self.gate.draining:
            raise Denied(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        key = self._authorize(service, method, token, adapter_id)
        releases: list[Callable[[], None]] = []
        limit = self._limit(key)
        if key is not None and limit and method in GENERATION_METHODS:
            if not self._slots.take(key.name, limit):
                raise Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"api key {key.name!r} has {limit} concurrent requests, "
                             f"the limit is {limit} (max_concurrent)",
                             retry_after_ms=self.retry_after_ms)
            releases.append(lambda: self._slots.give(key.name))
        if not self.gate.enter():
            for r in releases:
                r()
            raise Denied(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        releases.append(self.gate.leave)
        return _once(releases)

    def key_for(self, token: str | None) -> ApiKey | None:
        """The key presented (None without a keys file); raises Denied UNAUTHENTICATED."""
        if self.keys is None:
            return None
        if token is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "missing API key: send metadata 'authorization: Bearer <key>'")
        key = self.keys.authenticate(token)
        if key is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "API key not recognised")
        return key

    def _limit(self, key: ApiKey | None) -> int:
        if key is None:
            return 0
        return key.max_concurrent or self.max_concurrent_per_key

    def _authorize(self, service: str, method: str, token: str | None,
                   adapter_id: str) -> ApiKey | None:
        key = self.key_for(token)
        if key is None:
            return None
        if service == ADAPTER_ADMIN:
            if not key.admin:
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             f"api key {key.name!r} may not call AdapterAdmin")
        elif method in GENERATION_METHODS:
            if not key.allows(adapter_id):
                what = f"adapter {adapter_id!r}" if adapter_id else "the base model"
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             f"api key {key.name!r} may not use {what}")
        return key


def _once(releases: list[Callable[[], None]]) -> Callable[[], None]:
    lock = threading.Lock()
    done = [False]

    def release() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        for r in releases:
            r()

    return release


class _Malformed:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError and friends
            return _Malformed(e)

    return parse


def _check_parsed(request, context) -> None:
    if isinstance(request, _Malformed):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request is not a valid message for this method ({request.error})")


def _wrap(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        def unary_unary(request, context):
            _check_parsed(request, context)
            release = admit(request, context)
            try:
                return inner_uu(request, context)
            finally:
                release()

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        def unary_stream(request, context):
            _check_parsed(request, context)
            release = admit(request, context)
            context.add_callback(release)  # also when the client goes away mid-stream
            try:
                yield from inner_us(request, context)
            finally:
                release()

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer)
    return handler  # client-streaming methods: none in these services
