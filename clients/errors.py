"""gRPC status codes as typed exceptions.

Every failed RPC surfaces as a subclass of `SwitchboardError` that keeps the status code
and the server's message, so callers can `except NotFound` instead of inspecting
`grpc.RpcError`. `from_rpc_error` is the one place the mapping happens (sync and aio).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


class SwitchboardError(Exception):
    """A failed Switchboard call: `.code` is the grpc.StatusCode, `.details` the message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str = "",
        *,
        code: grpc.StatusCode | None = None,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        endpoint: str | None = None,
    ) -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
        self.endpoint = endpoint

    @property
    def code_name(self) -> str:
        return self.code.name

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class Cancelled(SwitchboardError):
    code = grpc.StatusCode.CANCELLED


class Unknown(SwitchboardError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(SwitchboardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(SwitchboardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(SwitchboardError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SwitchboardError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SwitchboardError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SwitchboardError):
    """Queue full or quota hit. `.retry_after` (seconds) comes from `retry-after-ms`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str = "", **kwargs: Any) -> None:
        super().__init__(details, **kwargs)
        self.retry_after: float | None = _retry_after_seconds(self.trailing_metadata)


class FailedPrecondition(SwitchboardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SwitchboardError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(SwitchboardError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(SwitchboardError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SwitchboardError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(SwitchboardError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(SwitchboardError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SwitchboardError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[SwitchboardError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[SwitchboardError]:
    return _BY_CODE.get(code, SwitchboardError)


def from_rpc_error(err: grpc.RpcError, *, endpoint: str | None = None) -> SwitchboardError:
    """Turn a grpc.RpcError (sync `grpc.Call` or `grpc.aio.AioRpcError`) into a typed error."""
    code = _call(err, "code") or grpc.StatusCode.UNKNOWN
    details = _call(err, "details") or ""
    trailing = _normalize_metadata(_call(err, "trailing_metadata"))
    cls = error_class(code)
    return cls(details, code=code, trailing_metadata=trailing, endpoint=endpoint)


def _call(err: Any, name: str) -> Any:
    fn = getattr(err, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # a half-built call object; the mapping must never raise itself
        return None


def _normalize_metadata(md: Iterable[Any] | None) -> tuple[tuple[str, str | bytes], ...]:
    if not md:
        return ()
    out = []
    for item in md:
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        out.append((str(key), value))
    return tuple(out)


def _retry_after_seconds(md: tuple[tuple[str, str | bytes], ...]) -> float | None:
    for key, value in md:
        if key.lower() != RETRY_AFTER_KEY:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        try:
            ms = float(text)
        except ValueError:
            return None
        return max(ms, 0.0) / 1000.0
    return None
