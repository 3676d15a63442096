"""Domain types shared by the servicer and the engines (no protos, no tensors)."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.grammar import ResponseFormat


class FinishReason(Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=lambda: StoppingParams(16))
    logprobs: bool = False
    deadline: float | None = None  # time.monotonic() value
    # structured output: a compiled format (server.engine.grammar); None = free text
    response_format: ResponseFormat | None = None


@dataclass
class Timings:
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    text: str = ""  # any text held back until the end (flushed on finish)


@dataclass
class ErrorEvent:
    code: str  # a grpc.StatusCode name: DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED ...
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


class EngineError(Exception):
    """A request the engine refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RequestHandle:
    """What the servicer holds for a submitted request: its events, the path that serves
    it ("pytorch" or "onnx") and a way to cancel it."""

    def __init__(self, request_id: str, adapter_id: str, adapter_version: str,
                 engine_path: str) -> None:
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.adapter_version = adapter_version
        self.engine_path = engine_path
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancel = lambda: None

    def bind_cancel(self, cancel) -> None:
        """Set by the engine that queued the request."""
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel()
