"""gRPC servicers: decode and validate, make one domain call, encode. No tensors here."""

from __future__ import annotations

import threading
import time

import grpc

from server import __version__
from server.api.convert import FINISH_REASONS, RequestConverter, timings_pb, top_logprobs_pb
from server.api.errors import InvalidArgument, abort, status_of
from server.engine.protocol import Engine
from server.engine.types import ErrorEvent, FinishReason, TokenEvent
from server.metrics import ServerMetrics
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

_TIERS = {"device": pb.ADAPTER_TIER_DEVICE, "host": pb.ADAPTER_TIER_HOST,
          "disk": pb.ADAPTER_TIER_DISK}
_PATHS = {"pytorch": pb.ENGINE_PATH_PYTORCH, "onnx": pb.ENGINE_PATH_ONNX}
_PATH_NAMES = {v: k for k, v in _PATHS.items()}


def _route(engine: Engine, adapter_id: str) -> tuple[int, str, str]:
    """(EnginePath, onnx variant, reason) of the path serving `adapter_id`."""
    r = engine.route(adapter_id)
    return _PATHS[r.path], r.variant if r.path == "onnx" else "", r.reason


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, engine: Engine, registry, converter: RequestConverter, model_id: str,
                 quantize: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.registry = registry  # server.adapters.registry.AdapterRegistry
        self.conv = converter
        self.model_id = model_id
        self.quantize = quantize
        self.metrics = metrics

    def _submit(self, request, context):
        try:
            req = self.conv.generation_request(request, context)
            handle = self.engine.submit(req, _PATH_NAMES.get(request.engine_path, ""))
        except Exception as e:
            self._count_error(request.adapter_id, e)
            abort(context, e, retry_after_ms=self.conv.limits.retry_after_ms)
        if not context.add_callback(lambda: _on_rpc_end(context, handle)):
            _on_rpc_end(context, handle)  # the call ended while submit waited
        self.metrics.request_started(request.adapter_id)
        return req, handle, _Account(self.metrics, req, context)

    def _count_error(self, adapter_id: str, exc: Exception) -> None:
        """A request refused before the engine took it: counted, no latency observed."""
        code, _ = status_of(exc)
        self.metrics.request_finished(adapter_id, code.name, None, None, None, 0, 0,
                                      cause=getattr(exc, "cause", ""))

    def Generate(self, request, context):
        req, handle, account = self._submit(request, context)
        text, ids, logprobs, tops = [], [], [], []
        while True:
            ev = handle.events.get()
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
                logprobs.extend(ev.logprobs)
                tops.extend(ev.top_logprobs)
                continue
            account.done(ev)
            if isinstance(ev, ErrorEvent):
                context.abort(grpc.StatusCode[ev.code], ev.message)
            text.append(ev.text)
            ids.extend(ev.token_ids)
            logprobs.extend(ev.logprobs)
            tops.extend(ev.top_logprobs)
            return pb.GenerateResponse(
                request_id=req.request_id,
                text="".join(text),
                token_ids=ids if request.response.token_ids else [],
                logprobs=logprobs,
                finish_reason=FINISH_REASONS[ev.reason],
                prompt_tokens=ev.prompt_tokens,
                completion_tokens=ev.completion_tokens,
                adapter_id=handle.adapter_id,
                adapter_version=handle.adapter_version,
                timings=timings_pb(ev.timings),
                engine_path=_PATHS[handle.engine_path],
                filtered=ev.filtered,
                filter_rules=ev.filter_rules,
                top_logprobs=top_logprobs_pb(tops),
            )

    def GenerateStream(self, request, context):
        req, handle, account = self._submit(request, context)
        # gRPC stops pulling from this generator once the client has gone (the next send
        # fails), so the end is also accounted when the generator is closed.
        context.add_callback(account.gone)
        want_ids = request.response.token_ids
        while True:
            ev = handle.events.get()
            if isinstance(ev, TokenEvent):
                account.tokens += len(ev.token_ids)
                yield pb.GenerateStreamResponse(
                    request_id=req.request_id, text=ev.text,
                    token_ids=ev.token_ids if want_ids else [], logprobs=ev.logprobs,
                    adapter_id=handle.adapter_id, adapter_version=handle.adapter_version,
                    engine_path=_PATHS[handle.engine_path],
                    top_logprobs=top_logprobs_pb(ev.top_logprobs),
                )
                continue
            account.done(ev)
            if isinstance(ev, ErrorEvent):
                context.abort(grpc.StatusCode[ev.code], ev.message)
            yield pb.GenerateStreamResponse(
                request_id=req.request_id, text=ev.text,
                token_ids=ev.token_ids if want_ids else [], logprobs=ev.logprobs,
                finish_reason=FINISH_REASONS[ev.reason],
                prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                adapter_id=handle.adapter_id, adapter_version=handle.adapter_version,
                timings=timings_pb(ev.timings),
                engine_path=_PATHS[handle.engine_path],
                filtered=ev.filtered, filter_rules=ev.filter_rules,
                top_logprobs=top_logprobs_pb(ev.top_logprobs),
            )
            return

    def Tokenize(self, request, context):
        try:
            ids = self.conv.prompt_ids(request)
        except InvalidArgument as e:
            abort(context, e)
        tokens = self.engine.tokenizer.convert_ids_to_tokens(ids)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    def GetModelInfo(self, request, context):
        info = self.engine.info()
        return pb.GetModelInfoResponse(
            model_id=self.model_id,
            fingerprint=info.fingerprint,
            architecture="LlamaForCausalLM",
            vocab_size=info.vocab_size,
            max_context_tokens=info.max_seq_len,
            max_new_tokens_limit=self.conv.limits.max_new_tokens,
            dtype=info.dtype,
            device=info.device,
            quantization=self.quantize,
            max_batch_size=info.max_batch_size,
            max_active_adapters=info.max_active_adapters,
            max_lora_rank=info.max_lora_rank,
            memory=[pb.MemoryUsage(part=k, bytes=v) for k, v in self.engine.memory().items()],
            version=__version__,
            adapter_routes=[
                pb.AdapterRoute(adapter_id=a.adapter_id, engine_path=path, onnx_variant=variant,
                                reason=reason)
                for a in self.registry.entries()
                for path, variant, reason in [_route(self.engine, a.adapter_id)]
            ],
        )


def report_finished(metrics: ServerMetrics, req, ev, code: str = "OK",
                    t0: float | None = None) -> None:
    """The request metrics of an accepted request that ended with `ev` (FinishEvent or
    ErrorEvent), for both APIs. An error observes the time since `t0` (time.monotonic() at
    acceptance; nothing without it); timings that did not happen (a cancelled request's
    queue wait and TTFT, the TTFT of a request without tokens) observe nothing."""
    adapter_id = req.adapter_id
    if isinstance(ev, ErrorEvent):
        metrics.request_finished(adapter_id, ev.code,
                                 None if t0 is None else time.monotonic() - t0, None, None,
                                 len(req.prompt_ids), 0, cause=ev.cause)
        return
    t = ev.timings
    if ev.reason == FinishReason.CANCELLED or code == "CANCELLED":
        metrics.request_finished(adapter_id, "CANCELLED", t.total_seconds, None, None,
                                 ev.prompt_tokens, ev.completion_tokens,
                                 finish_reason=FinishReason.CANCELLED.value)
        return
    got_token = ev.completion_tokens > 0
    metrics.request_finished(
        adapter_id, code, t.total_seconds,
        t.time_to_first_token_seconds if got_token else None, t.queue_seconds,
        ev.prompt_tokens, ev.completion_tokens, finish_reason=ev.reason.value,
        prefill_seconds=(t.time_to_first_token_seconds - t.queue_seconds
                         if got_token else None),
        decode_seconds=(t.total_seconds - t.time_to_first_token_seconds
                        if got_token else None))


class _Account:
    """Reports one accepted request's end to the metrics exactly once: from its last
    engine event, or, for a stream whose client went away before that event was read,
    as CANCELLED with the time measured here. Timings that did not happen (a cancelled
    request's queue wait and TTFT, the TTFT of a request without tokens) observe nothing."""

    def __init__(self, metrics: ServerMetrics, req, context) -> None:
        self.metrics = metrics
        self.req = req
        self.context = context
        self.t0 = time.monotonic()
        self.tokens = 0  # streamed so far
        self._lock = threading.Lock()
        self._reported = False

    def _first(self) -> bool:
        with self._lock:
            first, self._reported = not self._reported, True
            return first

    def done(self, ev) -> None:
        if self._first():
            report_finished(self.metrics, self.req, ev, t0=self.t0)

    def gone(self) -> None:
        """The stream's RPC ended. Before its first message the handler is still reading
        events and reports the end itself; after it, gRPC may have stopped pulling the
        generator (a send failed), so the end is reported here: the deadline if it has
        passed, else the client's cancel."""
        if self.tokens == 0 or not self._first():
            return
        code = "DEADLINE_EXCEEDED" if _deadline_passed(self.context) else "CANCELLED"
        self.metrics.request_finished(
            self.req.adapter_id, code, time.monotonic() - self.t0, None, None,
            len(self.req.prompt_ids), self.tokens,
            finish_reason=FinishReason.CANCELLED.value if code == "CANCELLED" else None)


# A client's gRPC library cancels the call when its deadline passes, and that cancel
# reaches the server a little before the server's own copy of the deadline (which starts
# when the call arrives). A cancel this close to the deadline is taken as the deadline.
DEADLINE_SLACK_S = 0.25


def _deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def _on_rpc_end(context, handle) -> None:
    """A call that ended with its request still in the engine was cancelled by the client,
    unless its deadline is (about to be) passed: then the engine ends it at that deadline
    itself, with the code that says why (DEADLINE_EXCEEDED, or RESOURCE_EXHAUSTED when it
    waited for an adapter slot), and the metrics count that rather than a cancel."""
    if not _deadline_passed(context):
        handle.cancel()


class AdapterAdminServicer(pb_grpc.AdapterAdminServicer):
    def __init__(self, engine: Engine, registry) -> None:
        self.engine = engine
        self.registry = registry

    def _info(self, entry) -> pb.AdapterInfo:
        path, variant, _ = _route(self.engine, entry.adapter_id)
        return pb.AdapterInfo(
            adapter_id=entry.adapter_id,
            method=entry.method,
            version=entry.version,
            tier=_TIERS[entry.tier],
            rank=entry.rank,
            size_bytes=entry.size_bytes,
            base_model_fingerprint=entry.base_fingerprint,
            path=str(entry.path),
            target_modules=entry.target_modules,
            slot=-1 if entry.slot is None else entry.slot,
            engine_path=path,
            onnx_variant=variant,
        )

    def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[self._info(e) for e in self.registry.entries()])

    def LoadAdapter(self, request, context):
        t0 = time.perf_counter()
        try:
            entry, replaced = self.registry.load(request.adapter_id, request.path)
        except Exception as e:
            abort(context, e)
        context.set_trailing_metadata((("load-seconds", f"{time.perf_counter() - t0:.4f}"),))
        return pb.LoadAdapterResponse(adapter=self._info(entry), replaced=replaced)

    def UnloadAdapter(self, request, context):
        try:
            self.registry.unload(request.adapter_id)
        except Exception as e:
            abort(context, e)
        return pb.UnloadAdapterResponse(unloaded=True)
