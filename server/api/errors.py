"""Exceptions -> gRPC status codes, in one place."""

from __future__ import annotations

import logging

import grpc

from server.adapters.lora import AdapterError
from server.adapters.registry import AdapterNotFoundError
from server.engine.types import EngineError

log = logging.getLogger(__name__)


class InvalidArgument(Exception):
    """A request field out of its limits; the message names the field and the limit."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AdapterError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineError):
        return grpc.StatusCode[exc.code], str(exc)
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def abort(context: grpc.ServicerContext, exc: BaseException,
          retry_after_ms: int | None = None) -> None:
    """End the call with exc's status; RESOURCE_EXHAUSTED carries the trailing metadata
    `retry-after-ms` when a hint is given."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms is not None:
        context.set_trailing_metadata((("retry-after-ms", str(retry_after_ms)),))
    context.abort(code, message)
