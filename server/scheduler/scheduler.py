"""Iteration-level scheduling (continuous batching), independent of torch.

Each call to `schedule` plans one engine step:
  1. every running sequence whose prompt is done decodes one token;
  2. running sequences still in prefill get the next chunk of their prompt;
  3. waiting sequences are admitted (FIFO, skipping those whose adapter cannot get a
     slot yet) while a KV row is free, the batch is not full and the token budget lasts.
Decode goes first so that long prefills, which are chunked to the budget, never stall
the streams already running. Cancelled and expired sequences leave at the next step.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"queue is full: {waiting} requests waiting, limit {limit}")
        self.waiting = waiting
        self.limit = limit


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_tokens_per_step: int = 512
    max_queue: int = 1024
    kv_rows: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError(
                f"max_tokens_per_step {self.max_tokens_per_step} is less than "
                f"max_batch_size {self.max_batch_size}: decode steps would not fit"
            )


@dataclass(eq=False)
class Sequence:
    """Scheduling state of one request. tokens = prompt + generated tokens."""

    request_id: str
    prompt_ids: list[int]
    payload: Any = None
    deadline: float | None = None  # time.monotonic() value
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already in the KV cache
    row: int | None = None
    cancelled: bool = False
    first_scheduled: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


@dataclass
class Entry:
    """Tokens [start, start + n) of `seq` run in this step."""

    seq: Sequence
    start: int
    n: int

    @property
    def samples(self) -> bool:
        """The step yields this sequence's next token (its prompt is complete)."""
        return self.start + self.n == self.seq.num_tokens


@dataclass
class StepPlan:
    entries: list[Entry]
    dropped: list[Sequence]  # cancelled or past their deadline; rows already freed

    @property
    def num_tokens(self) -> int:
        return sum(e.n for e in self.entries)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(config.kv_rows))
        heapq.heapify(self._free_rows)
        self._lock = threading.Lock()
        self.has_work = threading.Event()
        self._purged: list[Sequence] = []  # dropped by submit(); reported by the next plan

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                # Requests already cancelled or past their deadline must not hold the queue
                # against a live one until the engine's next step.
                self._purged += self._drop_finished(time.monotonic(), self.waiting)
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(len(self.waiting), self.config.max_queue)
            self.waiting.append(seq)
            self.has_work.set()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.running), len(self.waiting)

    def payloads(self) -> tuple[list[Any], list[Any]]:
        """The payloads of the running and the waiting sequences, taken under the lock."""
        with self._lock:
            return [s.payload for s in self.running], [s.payload for s in self.waiting]

    def schedule(self, can_admit: Callable[[Sequence], bool] = lambda s: True) -> StepPlan:
        now = time.monotonic()
        with self._lock:
            dropped = self._purged + self._drop_finished(now, (*self.running, *self.waiting))
            self._purged = []
            entries: list[Entry] = []
            budget = self.config.max_tokens_per_step
            for seq in self.running:  # decode first
                if not seq.in_prefill:
                    entries.append(Entry(seq, seq.num_computed, 1))
                    budget -= 1
            for seq in self.running:  # continue chunked prefills
                if seq.in_prefill and budget > 0:
                    n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                    entries.append(Entry(seq, seq.num_computed, n))
                    budget -= n
            admitted = []
            for seq in self.waiting:
                if budget <= 0 or not self._free_rows:
                    break
                if len(self.running) + len(admitted) >= self.config.max_batch_size:
                    break
                if not can_admit(seq):
                    continue
                seq.row = heapq.heappop(self._free_rows)
                seq.first_scheduled = now
                # num_computed > 0 when a prefix adapter fills the first cache positions
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                entries.append(Entry(seq, seq.num_computed, n))
                budget -= n
                admitted.append(seq)
            for seq in admitted:
                self.waiting.remove(seq)
                self.running.append(seq)
            if not self.waiting and not self.running:
                self.has_work.clear()
            return StepPlan(entries, dropped)

    def advance(self, plan: StepPlan) -> None:
        """Record that the plan's tokens are now in the KV cache."""
        for e in plan.entries:
            e.seq.num_computed = e.start + e.n

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, failed or cancelled) and free its row."""
        with self._lock:
            self._remove(seq)
            if not self.waiting and not self.running:
                self.has_work.clear()

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.row is not None:
            heapq.heappush(self._free_rows, seq.row)
            seq.row = None

    def _drop_finished(self, now: float, seqs) -> list[Sequence]:
        gone = [s for s in seqs if s.cancelled or (s.deadline is not None and now >= s.deadline)]
        for seq in gone:
            self._remove(seq)
        return gone
