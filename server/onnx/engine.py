"""The ONNX Runtime engine: continuous batching over one exported, merged model.

It serves a single adapter (merged into the graph). The request lifecycle (queue, sampling,
stops, cancel, deadline, row isolation, metrics) is the PyTorch engine's own
(`server.engine.lifecycle.RequestLoop`); this module only turns a step plan into logits.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.engine.engine import helper_thread_init
from server.engine.lifecycle import RequestLoop, RequestState
from server.engine.protocol import EngineInfo, Route
from server.engine.types import ONNX, EngineError, GenerationRequest, RequestHandle
from server.metrics import ServerMetrics
from server.onnx.session import OnnxDecoderSession
from server.output_policy import OutputPolicies
from server.scheduler.scheduler import Entry, Scheduler, SchedulerConfig, Sequence, StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxEngineConfig:
    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default (all cores)
    provider: str = "auto"  # auto (CUDA where available), cpu, cuda
    max_batch_size: int = 32
    max_tokens_per_step: int = 512
    max_queue: int = 1024


class OnnxEngine(RequestLoop):
    """An `Engine` (server.engine.protocol) for one merged export: requests name its
    adapter (or none, for an engine made without `adapter_id`)."""

    engine_path = ONNX

    def __init__(self, model_path: Path | str, tokenizer, eos_ids: set[int], max_seq_len: int,
                 config: OnnxEngineConfig, *, adapter_id: str = "", adapter_version: str = "",
                 variant: str = "", fingerprint: str = "",
                 metrics: ServerMetrics | None = None,
                 output_policies: OutputPolicies | None = None, adapter_policy=None) -> None:
        """`metrics`, `output_policies`, `adapter_policy`: as RequestLoop's (the router
        hands in the PyTorch engine's and the adapter version's policy)."""
        rows = config.max_batch_size
        super().__init__(tokenizer, eos_ids, max_seq_len, Scheduler(SchedulerConfig(
            max_batch_size=rows, max_tokens_per_step=max(config.max_tokens_per_step, rows),
            max_queue=config.max_queue, kv_rows=rows)), thread_name=f"onnx-{adapter_id}",
            metrics=metrics, output_policies=output_policies, adapter_policy=adapter_policy)
        self.config = config
        self.session = OnnxDecoderSession(model_path, threads=config.threads,
                                          provider=config.provider)
        self.adapter_id = adapter_id
        self.adapter_version = adapter_version
        self.variant = variant
        self.fingerprint = fingerprint  # the base model's, when the router knows it
        # the decode batch: its sequences in row order, their KV and mask
        self._batch: list[Sequence] = []
        self._kv: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)

    @property
    def nbytes(self) -> int:
        return self.session.nbytes

    def warmup(self, adapter_id: str = "") -> None:
        super().warmup(adapter_id or self.adapter_id)

    # ---- the Engine protocol, besides the lifecycle's -----------------------------------
    def info(self) -> EngineInfo:
        device = "cuda" if self.session.providers[0] == "CUDAExecutionProvider" else "cpu"
        return EngineInfo(
            fingerprint=self.fingerprint, vocab_size=self.session.vocab_size,
            max_seq_len=self.max_seq_len, dtype="float32", device=device,
            max_batch_size=self.config.max_batch_size, max_active_adapters=1,
            max_lora_rank=0)

    def memory(self) -> dict[str, int]:
        return {"onnx_sessions": self.nbytes}

    def route(self, adapter_id: str) -> Route:
        return Route(ONNX, self.variant)

    # ---- the backend: a step plan -> logits -------------------------------------------
    def _new_state(self, req: GenerationRequest, cancel: Callable[[], None]) -> RequestState:
        if req.adapter_id != self.adapter_id:  # the graph holds one adapter, merged
            raise EngineError("NOT_FOUND", f"adapter {req.adapter_id!r} is not served by "
                              f"this ONNX engine (it serves {self.adapter_id!r})")
        state = super()._new_state(req, cancel)
        state.kv = None  # the row's own cache while in prefill
        return state

    def _handle(self, req: GenerationRequest, adapter_version: str,
                cancel: Callable[[], None]) -> RequestHandle:
        return super()._handle(req, self.adapter_version, cancel)  # the export's version

    def _thread_init(self) -> None:
        helper_thread_init()  # sampling only; ONNX Runtime has its own thread pool

    def _forward(self, plan: StepPlan) -> tuple[list[Entry], torch.Tensor, int]:
        """Every session call first, then their caches are kept: a step that raises leaves
        each row's cache as it was, so a part of the plan can run again."""
        in_batch = set(self._batch)
        decode = [e for e in plan.entries if e.seq in in_batch or
                  (e.n == 1 and e.seq.payload.kv is not None and not e.seq.in_prefill)]
        alone = [e for e in plan.entries if e not in decode]
        sampled: list[tuple[Entry, np.ndarray]] = []
        commits = []
        if decode:
            rows, commit = self._decode(decode)
            sampled += rows
            commits.append(commit)
        for e in alone:
            row, commit = self._prefill(e)
            commits.append(commit)
            if e.samples:
                sampled.append((e, row))
        for commit in commits:
            commit()
        if not sampled:
            return [], torch.empty(0), plan.num_tokens
        logits = torch.from_numpy(np.stack([r for _, r in sampled]))
        return [e for e, _ in sampled], logits, plan.num_tokens

    def _prefill(self, e: Entry):
        """One prompt chunk of one row, on its own cache; -> (last-token logits [V], keep
        the new cache)."""
        state: RequestState = e.seq.payload
        past = state.kv if state.kv is not None else self.session.empty_past()
        ids = np.array([[e.seq.token_at(i) for i in range(e.start, e.start + e.n)]], np.int64)
        pos = np.arange(e.start, e.start + e.n, dtype=np.int64)[None]
        mask = np.ones((1, past[0].shape[2] + e.n), np.int64)
        logits, kv = self.session.step(ids, pos, mask, past)

        def commit() -> None:
            state.kv = kv

        return logits[0], commit

    def _decode(self, entries: list[Entry]):
        """One token for each row of the decode batch; -> ([(entry, logits [V])], keep the
        new cache)."""
        seqs = [e.seq for e in entries]
        if set(seqs) != set(self._batch):
            self._rebuild(seqs)
        by_seq = {e.seq: e for e in entries}
        ids = np.array([[s.token_at(by_seq[s].start)] for s in self._batch], np.int64)
        pos = np.array([[by_seq[s].start] for s in self._batch], np.int64)
        mask = np.concatenate([self._mask, np.ones((len(self._batch), 1), np.int64)], axis=1)
        logits, kv = self.session.step(ids, pos, mask, self._kv)

        def commit() -> None:
            self._kv, self._mask = kv, mask

        return [(by_seq[s], logits[i]) for i, s in enumerate(self._batch)], commit

    def _rebuild(self, seqs: list[Sequence]) -> None:
        """Make the decode batch hold exactly `seqs` (rows that stay keep their cache,
        newcomers bring their prefill cache), compacted: real entries first per row."""
        keep = [i for i, s in enumerate(self._batch) if s in seqs]
        for i, s in enumerate(self._batch):  # rows leaving, not finished: their own cache
            if s not in seqs:
                cols = np.flatnonzero(self._mask[i])
                s.payload.kv = [a[i:i + 1][:, :, cols] for a in self._kv]
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

    def _release(self, seq: Sequence) -> None:
        """The row leaves the decode batch (its cache columns go with it)."""
        seq.payload.kv = None
        if seq in self._batch:
            keep = [i for i, s in enumerate(self._batch) if s is not seq]
            self._batch = [self._batch[i] for i in keep]
            self._kv = [a[keep] for a in self._kv]
            self._mask = self._mask[keep]
