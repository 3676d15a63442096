"""Domain types shared by the servicer and the engines (no protos, no tensors)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from server.engine.grammar import ResponseFormat

# The path that serves a request: the PyTorch engine, or the ONNX Runtime engine of an
# adapter's merged export. "" where a path may be asked for means "whichever routes it".
EnginePath = Literal["pytorch", "onnx"]
PYTORCH: EnginePath = "pytorch"
ONNX: EnginePath = "onnx"
ENGINE_PATHS: tuple[str, ...] = get_args(EnginePath)


class FinishReason(Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    FILTERED = "filtered"  # an output-policy rule with action stop matched


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    # OpenAI's: logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0),
    # count(t) = occurrences of t in the tokens this request has generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


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
    top_logprobs: int = 0  # the most likely tokens (id, logprob) to report at each position
    deadline: float | None = None  # time.monotonic() value
    # Where the engine puts this request's events (anything with put/get, e.g. a queue
    # that wakes an asyncio loop); None = a queue.SimpleQueue made for the handle.
    events: Any = None
    # The request_id of a request submitted before this one to the same engine with the
    # same prompt and adapter (another choice of one HTTP request with n > 1): the PyTorch
    # engine copies its prompt's keys and values instead of computing them again.
    prefill_from: str = ""
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
    # per token: the request's top_logprobs most likely (token id, logprob), best first
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    text: str = ""  # any text held back until the end (flushed on finish)
    # with an output policy, token ids and logprobs follow their text: those held back
    # until the end come here (those of filtered text are dropped)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    filtered: bool = False  # an output-policy rule matched (redact or stop)
    filter_rules: tuple[str, ...] = ()  # the rules' names, never the matched text
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # held back
    cached_tokens: int = 0  # of prompt_tokens, those not computed (prefix cache, siblings)


@dataclass
class ErrorEvent:
    code: str  # a grpc.StatusCode name: DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED ...
    message: str
    cause: str = ""  # for RESOURCE_EXHAUSTED: which limit (server.metrics.EXHAUSTED_CAUSES)


Event = TokenEvent | FinishEvent | ErrorEvent


class EngineError(Exception):
    """A request the engine refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.cause = cause  # for RESOURCE_EXHAUSTED: which limit (queue_full, ...)


class RequestHandle:
    """What the servicer holds for a submitted request: its events, the path that serves
    it and a way to cancel it. Every field is set by the engine that queued the request
    (`adapter_version` may change once, before the request starts, when its adapter is
    replaced while it waits)."""

    request_id: str
    adapter_id: str
    adapter_version: str
    engine_path: EnginePath
    events: Any  # the request's GenerationRequest.events, else a queue.SimpleQueue[Event]

    def __init__(self, request_id: str, adapter_id: str, adapter_version: str,
                 engine_path: EnginePath, events=None,
                 cancel: Callable[[], None] | None = None) -> None:
        """`cancel`: the engine's way to cancel the request (given by the engine that
        queues it; by default cancelling does nothing)."""
        if engine_path not in ENGINE_PATHS:
            raise ValueError(f"engine_path {engine_path!r} is not one of "
                             f"{', '.join(ENGINE_PATHS)}")
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.adapter_version = adapter_version
        self.engine_path = engine_path
        self.events = queue.SimpleQueue() if events is None else events
        self._cancel = cancel or (lambda: None)

    def cancel(self) -> None:
        self._cancel()
