"""Proto <-> domain conversion, with every field validated against the server's limits."""

from __future__ import annotations

import math
import time
import uuid

import grpc

from server.api.errors import InvalidArgument
from server.config import Limits
from server.engine.grammar import KINDS, GrammarCompiler, GrammarError, ResponseFormat
from server.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
    Timings,
)
from switchboard.v1 import switchboard_pb2 as pb

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.FILTERED: pb.FINISH_REASON_FILTERED,
}
_ROLES = ("system", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit of top_logprobs


class RequestConverter:
    def __init__(self, tokenizer, vocab_size: int, max_seq_len: int, limits: Limits,
                 grammars: GrammarCompiler | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.limits = limits
        # structured output: one compiler (and compile cache) for every API of the server
        self.grammars = grammars or GrammarCompiler(tokenizer, vocab_size)

    # ---- structured output --------------------------------------------------------
    def response_format(self, kind: str, text: str = "") -> ResponseFormat:
        """The compiled format for GenerationRequest.response_format; the one entry point
        for every API. kind: json_schema (text: the schema as JSON), json_object (text
        unused) or regex (text: the expression). Raises InvalidArgument naming
        response_format and the problem; compiled formats are cached per (kind, text)."""
        field = f"response_format.{kind}"
        if kind not in KINDS:
            raise InvalidArgument(
                f"response_format kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "json_object":
            text = ""
        elif not text:
            raise InvalidArgument(f"{field} is empty")
        limit = self.limits.max_response_format_chars
        if len(text) > limit:
            raise InvalidArgument(f"{field} has {len(text)} characters; the limit is {limit}")
        try:
            return self.grammars.compile(kind, text)
        except GrammarError as e:
            raise InvalidArgument(f"{field} cannot be compiled: {e}") from None

    def _proto_response_format(self, msg: pb.GenerateRequest) -> ResponseFormat | None:
        if not msg.HasField("response_format"):
            return None
        rf = msg.response_format
        kind = rf.WhichOneof("format")
        if kind is None or (kind == "json_object" and not rf.json_object):
            return None  # unset, or json_object false: free text
        return self.response_format(kind, getattr(rf, kind) if kind != "json_object" else "")

    # ---- inputs -------------------------------------------------------------------
    def prompt_ids(self, msg) -> list[int]:
        """The token ids of a GenerateRequest's or TokenizeRequest's input."""
        kind = msg.WhichOneof("input")
        if kind is None:
            raise InvalidArgument("input is empty: set one of prompt, messages, token_ids")
        if kind == "prompt":
            if not msg.prompt:
                raise InvalidArgument("input.prompt is empty")
            self._check_chars("input.prompt", len(msg.prompt))
            return list(self.tokenizer.encode(msg.prompt))
        if kind == "messages":
            return self._chat_ids(msg.messages)
        ids = list(msg.token_ids.ids)
        if not ids:
            raise InvalidArgument("input.token_ids is empty")
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise InvalidArgument(
                f"input.token_ids contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})"
            )
        return ids

    def _chat_ids(self, chat) -> list[int]:
        if not chat.messages:
            raise InvalidArgument("input.messages is empty")
        messages = []
        total = 0
        for i, m in enumerate(chat.messages):
            if m.role not in _ROLES:
                raise InvalidArgument(
                    f"input.messages[{i}].role {m.role!r} is not one of {', '.join(_ROLES)}"
                )
            total += len(m.content)
            messages.append({"role": m.role, "content": m.content})
        self._check_chars("input.messages", total)
        add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        try:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_prompt, tokenize=True
            )
        except Exception as e:  # template errors (e.g. roles out of order) are the caller's
            raise InvalidArgument(f"input.messages cannot be rendered: {e}") from e
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def _check_chars(self, field: str, n: int) -> None:
        if n > self.limits.max_prompt_chars:
            raise InvalidArgument(
                f"{field} has {n} characters; the limit is {self.limits.max_prompt_chars}"
            )

    # ---- GenerateRequest ----------------------------------------------------------
    def generation_request(self, msg: pb.GenerateRequest, context) -> GenerationRequest:
        lim = self.limits
        s, st = msg.sampling, msg.stopping
        if not (math.isfinite(s.temperature) and 0 <= s.temperature <= 100):
            raise InvalidArgument(f"sampling.temperature must be in [0, 100] (got {s.temperature})")
        top_p = s.top_p or 1.0
        if not (math.isfinite(s.top_p) and 0 < top_p <= 1):
            raise InvalidArgument(f"sampling.top_p must be in (0, 1] (got {s.top_p})")
        if s.top_k > self.vocab_size:
            raise InvalidArgument(
                f"sampling.top_k {s.top_k} is greater than the vocabulary size {self.vocab_size}"
            )
        rep = s.repetition_penalty or 1.0
        if not (math.isfinite(s.repetition_penalty) and 0 < rep <= 10):
            raise InvalidArgument(
                f"sampling.repetition_penalty must be in (0, 10] (got {s.repetition_penalty})"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(s, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise InvalidArgument(f"sampling.{name} must be in [-2, 2] (got {value})")
        if msg.response.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"response.top_logprobs {msg.response.top_logprobs} is "
                                  f"greater than the limit {MAX_TOP_LOGPROBS}")
        max_new = st.max_new_tokens or lim.default_max_new_tokens
        if max_new > lim.max_new_tokens:
            raise InvalidArgument(
                f"stopping.max_new_tokens {max_new} is greater than the limit {lim.max_new_tokens}"
            )
        if len(st.stop_sequences) > lim.max_stop_sequences:
            raise InvalidArgument(
                f"stopping.stop_sequences has {len(st.stop_sequences)} entries; "
                f"the limit is {lim.max_stop_sequences}"
            )
        for i, seq in enumerate(st.stop_sequences):
            if not seq:
                raise InvalidArgument(f"stopping.stop_sequences[{i}] is empty")
            if len(seq) > lim.max_stop_sequence_chars:
                raise InvalidArgument(
                    f"stopping.stop_sequences[{i}] has {len(seq)} characters; "
                    f"the limit is {lim.max_stop_sequence_chars}"
                )
        response_format = self._proto_response_format(msg)
        ids = self.prompt_ids(msg)
        if lim.max_prompt_tokens and len(ids) > lim.max_prompt_tokens:
            raise InvalidArgument(
                f"input has {len(ids)} tokens; the limit is {lim.max_prompt_tokens} "
                "(max prompt tokens)"
            )
        if len(ids) + max_new > self.max_seq_len:
            raise InvalidArgument(
                f"input has {len(ids)} tokens and stopping.max_new_tokens is {max_new}: "
                f"together {len(ids) + max_new}, more than the context limit {self.max_seq_len}"
            )
        remaining = context.time_remaining() if context is not None else None
        if remaining is None or remaining > lim.max_request_seconds:
            remaining = lim.max_request_seconds  # --max-request-time caps every request
        deadline = time.monotonic() + remaining
        return GenerationRequest(
            request_id=msg.request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            adapter_id=msg.adapter_id,
            sampling=SamplingParams(
                temperature=s.temperature, top_p=top_p, top_k=s.top_k,
                repetition_penalty=rep, seed=s.seed if s.HasField("seed") else None,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            ),
            stopping=StoppingParams(max_new, tuple(st.stop_sequences), st.ignore_eos),
            logprobs=msg.response.logprobs,
            top_logprobs=msg.response.top_logprobs,
            deadline=deadline,
            response_format=response_format,
        )


def top_logprobs_pb(tops: list[list[tuple[int, float]]]) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=[i for i, _ in top], logprobs=[lp for _, lp in top])
            for top in tops]


def timings_pb(t: Timings) -> pb.Timings:
    return pb.Timings(
        queue_seconds=t.queue_seconds,
        time_to_first_token_seconds=t.time_to_first_token_seconds,
        total_seconds=t.total_seconds,
    )


def grpc_code_name(code: grpc.StatusCode) -> str:
    return code.name
