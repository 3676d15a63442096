"""Switchboard clients: sync and asyncio libraries, the CLI and the load generator."""

from .aio import AsyncSwitchboardClient
from .client import SwitchboardClient
from .errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
)
from .results import AdapterInfo, GenerateResult, ModelInfo, StreamChunk, Timings

__all__ = [
    "AdapterInfo",
    "AsyncSwitchboardClient",
    "DeadlineExceeded",
    "GenerateResult",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamChunk",
    "SwitchboardError",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "SwitchboardClient",
]
