"""The ONNX Runtime engine: continuous batching over one exported, merged model.

It serves a single adapter (merged into the graph) behind the PyTorch engine's interface:
`submit(GenerationRequest) -> RequestHandle`, `start/stop/warmup`, the same `Scheduler`,
`select_tokens`, `TextStream` and events. One engine thread runs the steps.

KV cache: a row in prefill keeps its own arrays (2L x [1, KV, len, D]) and runs alone,
chunk by chunk. Rows that decode share one padded batch (2L x [B, KV, W, D]) with an
attention mask [B, W]; each step appends one column for every row, so the batch the graph
returns is the next step's past with no copy on our side. Padding and the holes left when
rows join or leave are masked; positions come from position_ids, so where a row's entries
sit does not change its result. When rows join or leave the batch is rebuilt, compacted
(each row's real entries first), which also drops the holes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.engine.detokenizer import TextStream
from server.engine.engine import helper_thread_init
from server.engine.sampling import select_tokens
from server.engine.types import (
    EngineError,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    StoppingParams,
    Timings,
    TokenEvent,
)
from server.onnx.session import OnnxDecoderSession
from server.scheduler.scheduler import (
    Entry,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    Sequence,
    StepPlan,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxEngineConfig:
    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default (all cores)
    provider: str = "auto"  # auto (CUDA where available), cpu, cuda
    max_batch_size: int = 32
    max_tokens_per_step: int = 512
    max_queue: int = 1024


class _State:
    """Engine-side state of one request (Sequence.payload)."""

    def __init__(self, req: GenerationRequest, handle: RequestHandle, stream: TextStream,
                 generator: torch.Generator | None) -> None:
        self.req = req
        self.handle = handle
        self.stream = stream
        self.generator = generator
        self.kv: list[np.ndarray] | None = None  # own cache while in prefill
        self.arrival = time.monotonic()
        self.first_token: float | None = None


class OnnxEngine:
    engine_path = "onnx"

    def __init__(self, model_path: Path | str, tokenizer, eos_ids: set[int], max_seq_len: int,
                 config: OnnxEngineConfig, *, adapter_id: str = "", adapter_version: str = "",
                 variant: str = "") -> None:
        self.config = config
        self.session = OnnxDecoderSession(model_path, threads=config.threads,
                                          provider=config.provider)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len
        self.adapter_id = adapter_id
        self.adapter_version = adapter_version
        self.variant = variant
        rows = config.max_batch_size
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch_size=rows, max_tokens_per_step=max(config.max_tokens_per_step, rows),
            max_queue=config.max_queue, kv_rows=rows))
        self.metrics = None
        # the decode batch: its sequences in row order, their KV and mask
        self._batch: list[Sequence] = []
        self._kv: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- public interface (shared with the PyTorch engine) ----------------------------
    @property
    def nbytes(self) -> int:
        return self.session.nbytes

    def idle(self) -> bool:
        running, waiting = self.scheduler.counts()
        return running == 0 and waiting == 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"onnx-{self.adapter_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.scheduler.has_work.set()
        if self._thread:
            self._thread.join(timeout=10)

    def submit(self, req: GenerationRequest) -> RequestHandle:
        handle = RequestHandle(req.request_id, req.adapter_id, self.adapter_version)
        handle.engine_path = self.engine_path
        generator = None
        if not req.sampling.greedy:
            seed = req.sampling.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device="cpu").manual_seed(seed)
        state = _State(req, handle, TextStream(self.tokenizer, req.stopping.stop_sequences),
                       generator)
        seq = Sequence(req.request_id, list(req.prompt_ids), payload=state, deadline=req.deadline)

        def cancel() -> None:
            seq.cancelled = True
            self.scheduler.has_work.set()

        handle._cancel = cancel
        try:
            self.scheduler.submit(seq)
        except QueueFullError as e:
            raise EngineError("RESOURCE_EXHAUSTED", str(e)) from None
        return handle

    def warmup(self) -> None:
        ids = self.tokenizer.encode("Hello")[:8] or [0]
        handle = self.submit(GenerationRequest("warmup", ids, adapter_id=self.adapter_id,
                                               stopping=StoppingParams(4, ignore_eos=True)))
        while True:
            ev = handle.events.get(timeout=300)
            if isinstance(ev, ErrorEvent):
                raise RuntimeError(f"ONNX warm-up failed: {ev.message}")
            if isinstance(ev, FinishEvent):
                return

    # ---- engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        helper_thread_init()  # sampling only; ONNX Runtime has its own thread pool
        while not self._stopping.is_set():
            if not self.scheduler.has_work.wait(timeout=0.5):
                continue
            plan = self.scheduler.schedule()
            for seq in plan.dropped:
                self._finish_dropped(seq)
            if not plan.entries:
                if not plan.dropped:
                    time.sleep(0.001)
                continue
            try:
                self._run(plan)
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("ONNX engine step failed")
                for entry in plan.entries:
                    self._fail(entry.seq, "INTERNAL", f"ONNX engine step failed: {e}")

    def _run(self, plan: StepPlan) -> None:
        t0 = time.perf_counter()
        in_batch = set(self._batch)
        decode = [e for e in plan.entries if e.seq in in_batch or
                  (e.n == 1 and e.seq.payload.kv is not None and not e.seq.in_prefill)]
        alone = [e for e in plan.entries if e not in decode]
        sampled: list[tuple[Entry, np.ndarray]] = []
        if decode:
            sampled += self._decode(decode)
        for e in alone:
            row = self._prefill(e)
            if e.samples:
                sampled.append((e, row))
        self.scheduler.advance(plan)
        if sampled:
            self._sample([e for e, _ in sampled], np.stack([r for _, r in sampled]))
        if self.metrics is not None:
            self.metrics.observe_step(len(plan.entries), plan.num_tokens,
                                      time.perf_counter() - t0)

    def _prefill(self, e: Entry) -> np.ndarray:
        """One prompt chunk of one row, on its own cache; -> last-token logits [V]."""
        state: _State = e.seq.payload
        past = state.kv if state.kv is not None else self.session.empty_past()
        ids = np.array([[e.seq.token_at(i) for i in range(e.start, e.start + e.n)]], np.int64)
        pos = np.arange(e.start, e.start + e.n, dtype=np.int64)[None]
        mask = np.ones((1, past[0].shape[2] + e.n), np.int64)
        logits, state.kv = self.session.step(ids, pos, mask, past)
        return logits[0]

    def _decode(self, entries: list[Entry]) -> list[tuple[Entry, np.ndarray]]:
        seqs = [e.seq for e in entries]
        if set(seqs) != set(self._batch):
            self._rebuild(seqs)
        by_seq = {e.seq: e for e in entries}
        ids = np.array([[s.token_at(by_seq[s].start)] for s in self._batch], np.int64)
        pos = np.array([[by_seq[s].start] for s in self._batch], np.int64)
        mask = np.concatenate([self._mask, np.ones((len(self._batch), 1), np.int64)], axis=1)
        logits, self._kv = self.session.step(ids, pos, mask, self._kv)
        self._mask = mask
        return [(by_seq[s], logits[i]) for i, s in enumerate(self._batch)]

    def _rebuild(self, seqs: list[Sequence]) -> None:
        """Make the decode batch hold exactly `seqs` (rows that stay keep their cache,
        newcomers bring their prefill cache), compacted: real entries first per row."""
        keep = [i for i, s in enumerate(self._batch) if s in seqs]
        parts_kv: list[list[np.ndarray]] = []
        parts_mask: list[np.ndarray] = []
        order = [self._batch[i] for i in keep]
        if keep:
            parts_kv.append([a[keep] for a in self._kv])
            parts_mask.append(self._mask[keep])
        for s in seqs:
            if s in order:
                continue
            kv = s.payload.kv
            s.payload.kv = None
            parts_kv.append(kv)
            parts_mask.append(np.ones((1, kv[0].shape[2]), np.int64))
            order.append(s)
        width = max(m.shape[1] for m in parts_mask)
        kv_out, masks = [], []
        for kv, m in zip(parts_kv, parts_mask, strict=True):
            pad = width - m.shape[1]
            if pad:
                kv = [np.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in kv]
                m = np.pad(m, ((0, 0), (0, pad)))
            kv_out.append(kv)
            masks.append(m)
        mask = np.concatenate(masks)
        kv_cat = [np.concatenate([k[j] for k in kv_out]) for j in range(len(kv_out[0]))]
        # compact: a stable sort puts each row's real entries first, in order
        real = int(mask.sum(1).max())
        idx = np.argsort(1 - mask, axis=1, kind="stable")[:, :real]
        self._mask = np.take_along_axis(mask, idx, axis=1)
        gather = idx[:, None, :, None]
        self._kv = [np.take_along_axis(a, gather, axis=2) for a in kv_cat]
        self._batch = order

    def _drop_row(self, seq: Sequence) -> None:
        seq.payload.kv = None
        if seq in self._batch:
            keep = [i for i, s in enumerate(self._batch) if s is not seq]
            self._batch = [self._batch[i] for i in keep]
            self._kv = [a[keep] for a in self._kv]
            self._mask = self._mask[keep]

    # ---- tokens and endings (as the PyTorch engine) -------------------------------
    def _sample(self, sampled: list[Entry], logits: np.ndarray) -> None:
        states: list[_State] = [e.seq.payload for e in sampled]
        params = [s.req.sampling for s in states]
        histories = [(e.seq.prompt_ids + e.seq.output_ids) if p.repetition_penalty != 1.0
                     else None for e, p in zip(sampled, params, strict=True)]
        tokens, logprobs = select_tokens(torch.from_numpy(logits), params, histories,
                                         [s.generator for s in states],
                                         [s.req.logprobs for s in states])
        now = time.monotonic()
        for e, state, tok, lp in zip(sampled, states, tokens, logprobs, strict=True):
            seq = e.seq
            seq.output_ids.append(tok)
            if state.first_token is None:
                state.first_token = now
            stop = state.req.stopping
            reason, text = None, ""
            if tok in self.eos_ids and not stop.ignore_eos:
                reason = FinishReason.EOS
            else:
                text = state.stream.push(tok)
                if state.stream.stopped:
                    reason = FinishReason.STOP_SEQUENCE
            if reason is None and (len(seq.output_ids) >= stop.max_new_tokens
                                   or seq.num_tokens >= self.max_seq_len):
                reason = FinishReason.LENGTH
            state.handle.events.put(TokenEvent(text, [tok], [lp] if lp is not None else []))
            if reason is not None:
                self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        state: _State = seq.payload
        self.scheduler.finish(seq)
        self._drop_row(seq)
        now = time.monotonic()
        timings = Timings(
            queue_seconds=(seq.first_scheduled or now) - state.arrival,
            time_to_first_token_seconds=(state.first_token or now) - state.arrival,
            total_seconds=now - state.arrival,
        )
        tail = state.stream.flush() if reason != FinishReason.STOP_SEQUENCE else ""
        state.handle.events.put(FinishEvent(reason, len(seq.prompt_ids), len(seq.output_ids),
                                            timings, tail))

    def _finish_dropped(self, seq: Sequence) -> None:
        state: _State = seq.payload
        self._drop_row(seq)
        now = time.monotonic()
        if seq.cancelled:
            state.handle.events.put(FinishEvent(FinishReason.CANCELLED, len(seq.prompt_ids),
                                                len(seq.output_ids),
                                                Timings(total_seconds=now - state.arrival)))
        else:
            state.handle.events.put(ErrorEvent(
                "DEADLINE_EXCEEDED",
                f"deadline exceeded after {now - state.arrival:.3f}s with "
                f"{len(seq.output_ids)} tokens generated"))

    def _fail(self, seq: Sequence, code: str, message: str) -> None:
        self.scheduler.finish(seq)
        self._drop_row(seq)
        seq.payload.handle.events.put(ErrorEvent(code, message))
