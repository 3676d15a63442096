"""Domain values <-> switchboard.v1 protobuf messages; shared by the sync and aio clients."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Union

from switchboard.v1 import switchboard_pb2 as pb

from .results import (
    AdapterInfo,
    GenerateResult,
    LoadAdapterResult,
    ModelInfo,
    StreamChunk,
    Timings,
    TokenizeResult,
)

# A chat message may be a dict {"role", "content"}, a (role, content) pair or the proto.
Message = Union[Mapping[str, str], Sequence[str], "pb.ChatMessage"]

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_FILTERED: "filtered",
}
TIERS = {
    pb.ADAPTER_TIER_UNSPECIFIED: "",
    pb.ADAPTER_TIER_DEVICE: "device",
    pb.ADAPTER_TIER_HOST: "host",
    pb.ADAPTER_TIER_DISK: "disk",
}


def new_request_id() -> str:
    return uuid.uuid4().hex


def chat_messages(
    messages: Sequence[Message], add_generation_prompt: bool | None = None
) -> pb.ChatMessages:
    out = pb.ChatMessages()
    for i, msg in enumerate(messages):
        if isinstance(msg, pb.ChatMessage):
            out.messages.append(msg)
        elif isinstance(msg, Mapping):
            unknown = set(msg) - {"role", "content"}
            if unknown or "content" not in msg:
                raise ValueError(
                    f"messages[{i}] must have keys 'role' and 'content', got {sorted(msg)}"
                )
            out.messages.add(role=msg.get("role", "user"), content=msg["content"])
        elif isinstance(msg, Sequence) and not isinstance(msg, str) and len(msg) == 2:
            out.messages.add(role=msg[0], content=msg[1])
        else:
            raise ValueError(
                f"messages[{i}] must be a dict, a (role, content) pair or a ChatMessage, "
                f"got {type(msg).__name__}"
            )
    if add_generation_prompt is not None:
        out.add_generation_prompt = add_generation_prompt
    return out


def generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    token_ids: Sequence[int] | None = None,
    adapter_id: str = "",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    token_ids_out: bool = False,
    logprobs: bool = False,
    request_id: str | None = None,
    add_generation_prompt: bool | None = None,
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; exactly one of prompt, messages and token_ids is required.

    Structured output, at most one of: `json_schema` (a dict or JSON text), `json_object`
    (any JSON object), `regex` (the whole answer matches it).

    Unset optional parameters are sent as the proto's zero value (server default). Values
    are validated by the server, which names the field and the limit on INVALID_ARGUMENT.
    """
    given = [n for n, v in (("prompt", prompt), ("messages", messages),
                            ("token_ids", token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"exactly one of prompt, messages, token_ids is required, got {given or 'none'}"
        )
    req = pb.GenerateRequest(
        request_id=request_id or new_request_id(), adapter_id=adapter_id or ""
    )
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.messages.CopyFrom(chat_messages(messages, add_generation_prompt))
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids or ())
    req.sampling.temperature = float(temperature)
    if top_p is not None:
        req.sampling.top_p = float(top_p)
    if top_k is not None:
        req.sampling.top_k = int(top_k)
    if repetition_penalty is not None:
        req.sampling.repetition_penalty = float(repetition_penalty)
    if seed is not None:
        req.sampling.seed = int(seed)
    if max_new_tokens is not None:
        req.stopping.max_new_tokens = int(max_new_tokens)
    if stop is not None:
        req.stopping.stop_sequences.extend([stop] if isinstance(stop, str) else list(stop))
    req.stopping.ignore_eos = bool(ignore_eos)
    req.response.token_ids = bool(token_ids_out)
    req.response.logprobs = bool(logprobs)
    formats = [n for n, v in (("json_schema", json_schema), ("json_object", json_object or None),
                              ("regex", regex)) if v is not None]
    if len(formats) > 1:
        raise ValueError(f"at most one of json_schema, json_object, regex, got {formats}")
    if json_schema is not None:
        req.response_format.json_schema = (
            json_schema if isinstance(json_schema, str) else json.dumps(json_schema))
    elif json_object:
        req.response_format.json_object = True
    elif regex is not None:
        req.response_format.regex = regex
    return req


def tokenize_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    add_generation_prompt: bool | None = None,
) -> pb.TokenizeRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("exactly one of prompt, messages is required")
    if prompt is not None:
        return pb.TokenizeRequest(prompt=prompt)
    return pb.TokenizeRequest(messages=chat_messages(messages or (), add_generation_prompt))


def timings(msg: pb.Timings) -> Timings:
    return Timings(
        queue_seconds=msg.queue_seconds,
        time_to_first_token_seconds=msg.time_to_first_token_seconds,
        total_seconds=msg.total_seconds,
    )


def generate_result(msg: pb.GenerateResponse, endpoint: str = "") -> GenerateResult:
    return GenerateResult(
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=list(msg.logprobs),
        finish_reason=FINISH_REASONS.get(msg.finish_reason, str(msg.finish_reason)),
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        adapter_id=msg.adapter_id,
        adapter_version=msg.adapter_version,
        timings=timings(msg.timings),
        request_id=msg.request_id,
        endpoint=endpoint,
        filtered=msg.filtered,
        filter_rules=list(msg.filter_rules),
    )


def stream_chunk(msg: pb.GenerateStreamResponse, endpoint: str = "") -> StreamChunk:
    last = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return StreamChunk(
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=list(msg.logprobs),
        finish_reason=FINISH_REASONS.get(msg.finish_reason, str(msg.finish_reason))
        if last
        else None,
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        adapter_id=msg.adapter_id,
        adapter_version=msg.adapter_version,
        timings=timings(msg.timings) if msg.HasField("timings") else None,
        request_id=msg.request_id,
        endpoint=endpoint,
        filtered=msg.filtered,
        filter_rules=list(msg.filter_rules),
    )


def adapter_info(msg: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        adapter_id=msg.adapter_id,
        method=msg.method,
        version=msg.version,
        tier=TIERS.get(msg.tier, str(msg.tier)),
        rank=msg.rank,
        size_bytes=msg.size_bytes,
        base_model_fingerprint=msg.base_model_fingerprint,
        path=msg.path,
        target_modules=list(msg.target_modules),
        slot=msg.slot,
    )


def load_adapter_result(msg: pb.LoadAdapterResponse) -> LoadAdapterResult:
    return LoadAdapterResult(adapter=adapter_info(msg.adapter), replaced=msg.replaced)


def tokenize_result(msg: pb.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(token_ids=list(msg.token_ids), tokens=list(msg.tokens))


def model_info(msg: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=msg.model_id,
        fingerprint=msg.fingerprint,
        architecture=msg.architecture,
        vocab_size=msg.vocab_size,
        max_context_tokens=msg.max_context_tokens,
        max_new_tokens_limit=msg.max_new_tokens_limit,
        dtype=msg.dtype,
        device=msg.device,
        quantization=msg.quantization,
        max_batch_size=msg.max_batch_size,
        max_active_adapters=msg.max_active_adapters,
        max_lora_rank=msg.max_lora_rank,
        memory={m.part: m.bytes for m in msg.memory},
        version=msg.version,
    )


def result_from_chunks(chunks: Sequence[StreamChunk]) -> GenerateResult:
    """Fold a finished stream into the equivalent unary result."""
    if not chunks:
        raise ValueError("no stream chunks to fold")
    last = chunks[-1]
    return GenerateResult(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=[p for c in chunks for p in c.logprobs],
        finish_reason=last.finish_reason or "",
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        adapter_id=last.adapter_id,
        adapter_version=last.adapter_version,
        timings=last.timings or Timings(),
        request_id=last.request_id,
        endpoint=last.endpoint,
        filtered=last.filtered,
        filter_rules=list(last.filter_rules),
    )


def to_jsonable(value: Any) -> Any:
    """dataclass results (or lists/dicts of them) -> plain JSON values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value
