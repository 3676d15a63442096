"""OpenAI request bodies -> GenerateRequest messages, and the OpenAI response shapes.

The HTTP API (server/api/http.py) turns a `/v1/completions` or `/v1/chat/completions` body
into one `GenerateRequest` per choice and hands those to the same `RequestConverter` as
the gRPC servicer, so both APIs share every check and limit. Here only what is OpenAI's:
field names and types, `n`, the error JSON and its HTTP status, and the response and
chunk objects. The converter's messages name proto fields (`stopping.max_new_tokens`);
`http_error` renames them to the field the HTTP caller sent (`max_tokens`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from server.api.errors import status_of
from server.engine.types import FinishReason
from switchboard.v1 import switchboard_pb2 as pb

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit of `logprobs` on /v1/completions

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class HttpError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_field(param: str, message: str) -> HttpError:
    return HttpError(400, message, param=param, code="invalid_value")


Names = list[tuple[str, str, str]]  # (text in a converter message, replacement, param)


def http_error(code: grpc.StatusCode, message: str, names: Names | None = None,
               retry_after_ms: int | None = None) -> HttpError:
    """A gRPC status (from the converter, the engine or the security policy) as the HTTP
    answer; proto field paths in the message become the HTTP caller's field names."""
    status, kind = _HTTP_STATUS.get(code, (500, "server_error"))
    found = [(message.find(proto), proto, name, field_name)
             for proto, name, field_name in names or () if proto in message]
    param = min(found)[3] if found else None  # the field the message names first
    for _, proto, name, _ in found:
        message = message.replace(proto, name)
    headers = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
                   "retry-after-ms": str(retry_after_ms)}
    if status == 503:
        headers["Retry-After"] = "1"
    return HttpError(status, message, type=kind, param=param, code=code.name.lower(),
                     headers=headers)


def error_from(exc: BaseException, names: Names | None = None,
               retry_after_ms: int | None = None) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    code, message = status_of(exc)
    return http_error(code, message, names, retry_after_ms)


# ---- requests -----------------------------------------------------------------------
@dataclass
class Parsed:
    """One HTTP generation request: a GenerateRequest per choice (prompt-major: choice
    i is prompt i // n, sample i % n) and how to answer."""

    chat: bool
    model: str
    requests: list[pb.GenerateRequest]
    prompts: int  # distinct prompts (usage counts each once)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # completions: top-n per token; chat: top_logprobs
    names: Names = field(default_factory=list)  # proto field -> HTTP field


_UNSUPPORTED = {  # field -> value that means "not used"
    "echo": False, "suffix": None, "logit_bias": None, "tools": None, "functions": None,
    "tool_choice": None, "function_call": None, "audio": None, "modalities": None,
    "prediction": None,
}


def _get(body: dict, name: str, kinds: tuple[type, ...], default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise bad_field(name, f"{name} must be {_kind_names(kinds)} (got {value!r})")
    if not isinstance(value, kinds):
        raise bad_field(name, f"{name} must be {_kind_names(kinds)} (got {type(value).__name__})")
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    if float in kinds:
        kinds = tuple(k for k in kinds if k is not int)  # "a number" covers integers
    return " or ".join(dict.fromkeys(names[k] for k in kinds if k in names))


def _count(body: dict, name: str, default: int | None = 0) -> int | None:
    """An integer field that goes into a uint32 proto field."""
    value = _get(body, name, (int,), default)
    if value is not None and value >= 1 << 31:
        raise bad_field(name, f"{name} {value} is out of range")
    return value


def _number(body: dict, name: str, default: float) -> float:
    return float(_get(body, name, (int, float), default))


def response_format_spec(body: dict) -> tuple[str, str] | None:
    """`response_format` -> (kind, JSON schema text) for the grammar: kind "json_schema"
    with the schema given, or "json_object" with `{"type": "object"}` (any JSON object);
    None for no constraint (absent or {"type": "text"}). Raises HttpError 400 naming the
    field for a malformed value."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_field("response_format", "response_format must be an object with a 'type' "
                        "of text, json_object or json_schema")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_field("response_format.json_schema",
                            "response_format.json_schema must be an object with 'name' and "
                            "'schema'")
        schema = spec.get("schema")
        if not isinstance(schema, dict | bool):
            raise bad_field("response_format.json_schema.schema",
                            "response_format.json_schema.schema must be a JSON schema object")
        return "json_schema", json.dumps(schema)
    raise bad_field("response_format.type", f"response_format.type {kind!r} is not one of "
                    "text, json_object, json_schema")


def parse_request(body: Any, *, chat: bool, max_choices: int) -> Parsed:
    """Validate an OpenAI body's shape and types and build its GenerateRequests; the
    values' limits are the converter's (checked when each request is converted)."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    model = _get(body, "model", (str,))
    if not model:
        raise bad_field("model", "model is required: the base model's id or an adapter id "
                        "(GET /v1/models lists them)")
    for name, unused in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != unused and value != [] and value != {}:
            raise bad_field(name, f"{name} is not supported by this server")
    best_of = _get(body, "best_of", (int,))
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= max_choices:
        raise bad_field("n", f"n must be in [1, {max_choices}] (got {n}); the limit is "
                        "the server's batch size")
    if best_of is not None and best_of != n:
        raise bad_field("best_of", "best_of is not supported by this server (other than "
                        "best_of = n)")
    fmt = response_format_spec(body)  # compiled by the converter, as for gRPC

    if body.get("top_p") is not None and _number(body, "top_p", 1.0) <= 0:
        raise bad_field("top_p", f"top_p must be in (0, 1] (got {body['top_p']})")
    top_k = _count(body, "top_k")  # top_k, repetition_penalty, ignore_eos: vLLM's
    if top_k < 0:                          # extensions, in their meaning there
        raise bad_field("top_k", f"top_k must be at least 0 (got {top_k})")
    rep = _number(body, "repetition_penalty", 1.0)
    if rep <= 0:
        raise bad_field("repetition_penalty", f"repetition_penalty must be in (0, 10] (got {rep})")
    sampling = pb.SamplingParameters(
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=top_k,
        repetition_penalty=rep,
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
    )
    seed = _get(body, "seed", (int,))
    if seed is not None:
        if not 0 <= seed < 1 << 64:
            raise bad_field("seed", f"seed must be in [0, 2^64) (got {seed})")
        sampling.seed = seed
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _count(body, max_name)
    if max_tokens < (1 if body.get(max_name) is not None else 0):
        raise bad_field(max_name, f"{max_name} must be at least 1 (got {max_tokens})")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise bad_field("stop", "stop must be a string or an array of strings")
    stopping = pb.StoppingCriteria(max_new_tokens=max_tokens, stop_sequences=stops,
                                   ignore_eos=_get(body, "ignore_eos", (bool,), False))

    response = pb.ResponseOptions()
    logprobs: int | None = None
    if chat:
        if _get(body, "logprobs", (bool,), False):
            logprobs = _count(body, "top_logprobs")
            if logprobs < 0:
                raise bad_field("top_logprobs", f"top_logprobs must be at least 0 (got {logprobs})")
            response.logprobs = True
            response.top_logprobs = logprobs
        elif body.get("top_logprobs"):
            raise bad_field("top_logprobs", "top_logprobs needs logprobs: true")
    else:
        lp = _count(body, "logprobs", None)
        if lp is not None:
            if not 0 <= lp <= MAX_COMPLETION_LOGPROBS:
                raise bad_field("logprobs", f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}]"
                                f" (got {lp})")
            logprobs = lp
            response.logprobs = True
            response.top_logprobs = lp

    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise bad_field("stream_options", "stream_options is only allowed with stream: true")
    include_usage = bool(options.get("include_usage", False))

    inputs = [_chat_input(body)] if chat else _completion_inputs(body)
    if len(inputs) * n > max_choices:
        raise bad_field("n", f"{len(inputs)} prompts times n = {n} make {len(inputs) * n} "
                        f"choices; the limit is {max_choices}")
    requests = []
    for inp in inputs:
        for j in range(n):
            req = pb.GenerateRequest(request_id=uuid.uuid4().hex, sampling=sampling,
                                     stopping=stopping, response=response)
            if fmt is not None and fmt[0] == "json_object":
                req.response_format.json_object = True
            elif fmt is not None:
                req.response_format.json_schema = fmt[1]
            if seed is not None:  # choice j samples with seed + j: n different samples
                req.sampling.seed = (seed + j) % (1 << 64)
            if isinstance(inp, pb.ChatMessages):
                req.messages.CopyFrom(inp)
            elif isinstance(inp, str):
                req.prompt = inp
            else:
                req.token_ids.ids.extend(inp)
            requests.append(req)
    source = "messages" if chat else "prompt"
    renames = {
        "sampling.temperature": "temperature", "sampling.top_p": "top_p",
        "sampling.top_k": "top_k", "sampling.repetition_penalty": "repetition_penalty",
        "sampling.presence_penalty": "presence_penalty",
        "sampling.frequency_penalty": "frequency_penalty",
        "stopping.max_new_tokens": max_name, "stopping.stop_sequences": "stop",
        "response.top_logprobs": "top_logprobs" if chat else "logprobs",
        "response_format.json_schema": "response_format.json_schema.schema",
        "response_format.json_object": "response_format",
        "input.messages": "messages", "input.prompt": "prompt", "input.token_ids": "prompt",
    }
    names = [(k, v, v.split("[")[0]) for k, v in renames.items()]
    names.append(("input has", f"{source} has", source))
    return Parsed(chat, model, requests, len(inputs), stream, include_usage, logprobs, names)


def _completion_inputs(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    if prompt is None:
        raise bad_field("prompt", "prompt is required")
    raise bad_field("prompt", "prompt must be a string, an array of strings, an array of "
                    "token ids or an array of arrays of token ids (none empty)")


_ROLE_ALIASES = {"developer": "system"}


def _chat_input(body: dict) -> pb.ChatMessages:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "messages must be a non-empty array")
    out = pb.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_field(f"messages[{i}]", f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise bad_field(f"messages[{i}].content[{j}]",
                                    f"messages[{i}].content[{j}] must be a text part "
                                    "({\"type\": \"text\", \"text\": ...}); only text is "
                                    "supported")
                parts.append(part["text"])
            text = "".join(parts)
        else:
            raise bad_field(f"messages[{i}].content",
                            f"messages[{i}].content must be a string or an array of parts")
        role = _ROLE_ALIASES.get(m["role"], m["role"])
        out.messages.append(pb.ChatMessage(role=role, content=text))
    return out


# ---- responses ----------------------------------------------------------------------
FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop",
          FinishReason.STOP_SEQUENCE: "stop", FinishReason.CANCELLED: "stop",
          FinishReason.FILTERED: "content_filter"}  # an output-policy stop rule


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens whose keys
    and values were reused (the prefix cache) rather than computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class LogprobsBuilder:
    """Per choice: the tokens' logprobs in the endpoint's shape (completions: tokens,
    token_logprobs, top_logprobs, text_offset; chat: content[] with top_logprobs)."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat

    def piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def build(self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
              offset: int) -> dict[str, Any]:
        tokens = [self.piece(i) for i in ids]
        if self.chat:
            return {"content": [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": (t := self.piece(j)), "logprob": v,
                                   "bytes": list(t.encode())} for j, v in top]}
                for tok, lp, top in zip(tokens, lps, tops or [[]] * len(ids), strict=True)]}
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [{self.piece(j): v for j, v in top} for top in tops]
                if tops else None,
                "text_offset": offsets}


def completion_object(parsed: Parsed, rid: str, created: int, choices: list[dict],
                      use: dict[str, int], fingerprint: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if parsed.chat else "text_completion",
            "created": created, "model": parsed.model, "system_fingerprint": fingerprint,
            "choices": choices, "usage": use}


def choice_object(parsed: Parsed, index: int, text: str, finish: str | None,
                  logprobs: dict | None, *, delta: bool = False,
                  first: bool = False) -> dict[str, Any]:
    if not parsed.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if delta:
        d: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            d["content"] = text
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish}


def chunk_object(parsed: Parsed, rid: str, created: int, choices: list[dict],
                 fingerprint: str, use: dict | None = None) -> dict[str, Any]:
    out = {"id": rid, "object": "chat.completion.chunk" if parsed.chat else "text_completion",
           "created": created, "model": parsed.model, "system_fingerprint": fingerprint,
           "choices": choices}
    if parsed.include_usage:
        out["usage"] = use
    return out


def now() -> int:
    return int(time.time())

