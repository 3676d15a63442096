"""gRPC servicers: decode and validate, make one domain call, encode. No tensors here."""

from __future__ import annotations

import time

import grpc

from server import __version__
from server.api.convert import FINISH_REASONS, RequestConverter, timings_pb, top_logprobs_pb
from server.api.errors import InvalidArgument, abort, status_of
from server.engine.types import EngineError, ErrorEvent, FinishEvent, TokenEvent
from server.metrics import ServerMetrics
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

_TIERS = {"device": pb.ADAPTER_TIER_DEVICE, "host": pb.ADAPTER_TIER_HOST,
          "disk": pb.ADAPTER_TIER_DISK}
_PATHS = {"pytorch": pb.ENGINE_PATH_PYTORCH, "onnx": pb.ENGINE_PATH_ONNX}
_PATH_NAMES = {v: k for k, v in _PATHS.items()}


def submit_to(engine, req, engine_path: str):
    """The ONNX router (server.onnx.router) takes the requested path; a lone PyTorch engine
    serves everything but an explicit ONNX request."""
    if hasattr(engine, "route"):
        return engine.submit(req, engine_path=engine_path)
    if engine_path == "onnx":
        raise EngineError("FAILED_PRECONDITION", "engine_path ONNX: the ONNX path is not "
                          "enabled on this server (start it with --onnx)")
    return engine.submit(req)


def report_finished(metrics: ServerMetrics, req, ev, code: str = "OK") -> None:
    """The request metrics of a request that ended with `ev` (FinishEvent or ErrorEvent)."""
    if isinstance(ev, FinishEvent):
        t = ev.timings
        ttft = t.time_to_first_token_seconds if ev.completion_tokens else None
        metrics.request_finished(req.adapter_id, code, t.total_seconds, ttft,
                                 t.queue_seconds, ev.prompt_tokens, ev.completion_tokens)
    else:
        metrics.request_finished(req.adapter_id, ev.code, 0.0, None, None,
                                 len(req.prompt_ids), 0)


def _route(engine, adapter_id: str) -> tuple[int, str, str]:
    """(EnginePath, onnx variant, reason) of the engine serving `adapter_id`."""
    if not hasattr(engine, "route"):
        return pb.ENGINE_PATH_PYTORCH, "", ""
    r = engine.route(adapter_id)
    return _PATHS[r.path], r.variant if r.path == "onnx" else "", r.reason


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, engine, converter: RequestConverter, model_id: str, quantize: str,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.conv = converter
        self.model_id = model_id
        self.quantize = quantize
        self.metrics = metrics

    def _submit(self, request, context):
        try:
            req = self.conv.generation_request(request, context)
            handle = submit_to(self.engine, req, _PATH_NAMES.get(request.engine_path, ""))
        except Exception as e:
            self._count_error(request.adapter_id, e)
            abort(context, e, retry_after_ms=self.conv.limits.retry_after_ms)
        context.add_callback(handle.cancel)
        self.metrics.request_started(request.adapter_id)
        return req, handle

    def _count_error(self, adapter_id: str, exc: Exception) -> None:
        code, _ = status_of(exc)
        self.metrics.request_finished(adapter_id, code.name, 0.0, None, None, 0, 0)

    def _done(self, req, ev, context, code: str = "OK") -> None:
        report_finished(self.metrics, req, ev, code)

    def Generate(self, request, context):
        req, handle = self._submit(request, context)
        text, ids, logprobs, tops = [], [], [], []
        while True:
            ev = handle.events.get()
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
                logprobs.extend(ev.logprobs)
                tops.extend(ev.top_logprobs)
                continue
            self._done(req, ev, context)
            if isinstance(ev, ErrorEvent):
                context.abort(grpc.StatusCode[ev.code], ev.message)
            text.append(ev.text)
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
                top_logprobs=top_logprobs_pb(tops),
            )

    def GenerateStream(self, request, context):
        req, handle = self._submit(request, context)
        want_ids = request.response.token_ids
        while True:
            ev = handle.events.get()
            if isinstance(ev, TokenEvent):
                yield pb.GenerateStreamResponse(
                    request_id=req.request_id, text=ev.text,
                    token_ids=ev.token_ids if want_ids else [], logprobs=ev.logprobs,
                    adapter_id=handle.adapter_id, adapter_version=handle.adapter_version,
                    engine_path=_PATHS[handle.engine_path],
                    top_logprobs=top_logprobs_pb(ev.top_logprobs),
                )
                continue
            self._done(req, ev, context)
            if isinstance(ev, ErrorEvent):
                context.abort(grpc.StatusCode[ev.code], ev.message)
            yield pb.GenerateStreamResponse(
                request_id=req.request_id, text=ev.text,
                finish_reason=FINISH_REASONS[ev.reason],
                prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                adapter_id=handle.adapter_id, adapter_version=handle.adapter_version,
                timings=timings_pb(ev.timings),
                engine_path=_PATHS[handle.engine_path],
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
        e = self.engine
        lim = self.conv.limits
        return pb.GetModelInfoResponse(
            model_id=self.model_id,
            fingerprint=e.fingerprint,
            architecture="LlamaForCausalLM",
            vocab_size=e.spec.vocab_size,
            max_context_tokens=e.max_seq_len,
            max_new_tokens_limit=lim.max_new_tokens,
            dtype=str(e.dtype).removeprefix("torch."),
            device=str(e.device),
            quantization=self.quantize,
            max_batch_size=e.max_batch_size,
            max_active_adapters=e.table.num_slots,
            max_lora_rank=e.table.max_rank,
            memory=[pb.MemoryUsage(part=k, bytes=v) for k, v in e.memory().items()],
            version=__version__,
            adapter_routes=[
                pb.AdapterRoute(adapter_id=a.adapter_id, engine_path=path, onnx_variant=variant,
                                reason=reason)
                for a in e.registry.entries()
                for path, variant, reason in [_route(e, a.adapter_id)]
            ],
        )


class AdapterAdminServicer(pb_grpc.AdapterAdminServicer):
    def __init__(self, engine) -> None:
        self.engine = engine
        self.registry = engine.registry

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
