"""Plain result types returned by the clients (no protobuf objects leak to callers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Timings:
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    # "eos", "length", "stop_sequence", "cancelled", "filtered" ("" if unspecified)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str
    adapter_version: str
    timings: Timings
    request_id: str = ""
    endpoint: str = ""  # the replica that answered
    filtered: bool = False  # an output-policy rule matched (redact or stop)
    filter_rules: list[str] = field(default_factory=list)  # their names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StreamChunk:
    """One streamed step: `text` is the delta; `finish_reason` is None until the last chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str
    adapter_version: str
    timings: Timings | None
    request_id: str = ""
    endpoint: str = ""
    filtered: bool = False  # on the last chunk
    filter_rules: list[str] = field(default_factory=list)

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    tokens: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    method: str
    version: str
    tier: str  # "device", "host", "disk" ("" if unspecified)
    rank: int
    size_bytes: int
    base_model_fingerprint: str
    path: str = ""
    target_modules: list[str] = field(default_factory=list)
    slot: int = -1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadAdapterResult:
    adapter: AdapterInfo
    replaced: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    fingerprint: str
    architecture: str
    vocab_size: int
    max_context_tokens: int
    max_new_tokens_limit: int
    dtype: str
    device: str
    quantization: str
    max_batch_size: int
    max_active_adapters: int
    max_lora_rank: int
    memory: dict[str, int]
    version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
