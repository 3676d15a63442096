"""The one interface the APIs and the app see of an engine.

Three classes implement it: the PyTorch engine (`server.engine.engine.Engine`), the ONNX
Runtime engine of one merged export (`server.onnx.engine.OnnxEngine`) and the router
that sends each request to one of them (`server.onnx.router.EngineRouter`). The servicer
and the HTTP API call only what is declared here; nothing asks which engine it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from server.engine.types import (
    ENGINE_PATHS,
    EngineError,
    EnginePath,
    GenerationRequest,
    RequestHandle,
)


class Route(NamedTuple):
    """Which path serves requests for an adapter, as reported by ListAdapters and
    GetModelInfo.adapter_routes."""

    path: EnginePath
    variant: str = ""  # fp32, int8, int4 on the ONNX path
    reason: str = ""  # why an adapter with an export is not (yet) on the ONNX path


@dataclass(frozen=True)
class EngineInfo:
    """What GetModelInfo, the metrics and the request converter need of an engine."""

    fingerprint: str  # the base model's (server.model_store.model_fingerprint)
    vocab_size: int
    max_seq_len: int  # the context limit: prompt, virtual tokens and new tokens
    dtype: str  # float32, bfloat16, ...
    device: str  # cpu, cuda, cuda:1, ...
    max_batch_size: int  # rows one step may run
    max_active_adapters: int  # adapters on the device at once
    max_lora_rank: int  # 0 where no LoRA is applied at run time (a merged export)
    quantization: str = "none"  # the base's weights: none, int8, int4, bf16, nf4 (as served)


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    detail: str = ""  # why not, when not ok


@runtime_checkable
class Engine(Protocol):
    tokenizer: Any  # a Hugging Face tokenizer (Tokenize, the request converter)

    def submit(self, req: GenerationRequest, engine_path: str = "") -> RequestHandle:
        """Queue `req`; its events arrive on the handle. `engine_path`: "" (whichever
        serves its adapter), "pytorch" or "onnx" (that path or FAILED_PRECONDITION).
        Raises EngineError (a gRPC status name) when the request cannot be queued."""
        ...

    def route(self, adapter_id: str) -> Route:
        """The path a request for `adapter_id` would take now (loads nothing)."""
        ...

    def info(self) -> EngineInfo: ...

    def memory(self) -> dict[str, int]:
        """Bytes held per part (base_model, kv_cache, adapter_slots, onnx_sessions, ...)."""
        ...

    def health(self) -> EngineHealth:
        """Whether the engine threads are running (not before start, not after stop)."""
        ...

    def start(self) -> None: ...

    def warmup(self) -> None:
        """One short generation through every loaded path, before the server is ready."""
        ...

    def stop(self) -> None: ...


def check_engine_path(engine_path: str) -> None:
    """INVALID_ARGUMENT unless `engine_path` is "" or one of ENGINE_PATHS."""
    if engine_path and engine_path not in ENGINE_PATHS:
        raise EngineError("INVALID_ARGUMENT", f"engine_path {engine_path!r} is not one of "
                          f"{', '.join(ENGINE_PATHS)}")
