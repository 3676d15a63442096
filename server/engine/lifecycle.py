"""One request lifecycle for every backend: queue, admission, the step loop, sampling, stop
conditions, finish, cancel, deadline, per-row fault isolation and the engine's metrics.

A failing step fails only its own rows (`_run_isolated`). Anything else that escapes the
step loop ends the engine thread (`_die`): every request it holds ends with UNAVAILABLE
and the reason, new ones are refused the same way, and `health()` turns not ok, so the
server reports NOT_SERVING and a supervisor can replace it; nothing is left hanging.

A backend (the PyTorch model, an ONNX Runtime session) subclasses `RequestLoop` and turns
a step plan into logits (`_forward`); it may also gate admission (`_can_admit`), free what
a row held (`_release`), say why a dropped request ended (`_deadline_error`) and report its
KV-cache use (`_kv_usage`). Everything a client can observe about a request (its events,
its status codes, its timings and the metrics it moves) is decided here, once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from server.engine.detokenizer import TextStream
from server.engine.grammar import mask_logits
from server.engine.protocol import EngineHealth, EngineInfo, Route, check_engine_path
from server.engine.sampling import select_tokens
from server.engine.types import (
    ONNX,
    EngineError,
    EnginePath,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    StoppingParams,
    Timings,
    TokenEvent,
)
from server.isolation import isolate, nonfinite_message, nonfinite_rows
from server.metrics import ServerMetrics
from server.output_policy import OutputPolicies
from server.scheduler.scheduler import Entry, QueueFullError, Scheduler, Sequence, StepPlan

log = logging.getLogger(__name__)


class RequestState:
    """Engine-side state of one request (`Sequence.payload`); backends add their fields."""

    def __init__(self, req: GenerationRequest, handle: RequestHandle, stream: TextStream,
                 generator: torch.Generator | None) -> None:
        self.req = req
        self.handle = handle
        self.stream = stream
        self.generator = generator
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.virtual = 0  # virtual tokens (soft prompt or prefix) before the prompt
        self.cached_tokens = 0  # prompt tokens whose keys and values came from a cache
        self.error: tuple[str, str] | None = None  # (code, message) for a dropped request
        self.guard = None  # textguard PolicyStream: the output policy, when there is one
        # structured output: the request's position in its grammar (None = free text)
        fmt = req.response_format
        self.matcher = fmt.matcher() if fmt is not None else None


class RequestLoop:
    """The lifecycle; one engine thread runs `_loop`, other threads only `submit`.

    A subclass is an `Engine` (server.engine.protocol) once it names its `engine_path`
    and gives `info` and `memory`."""

    engine_path: EnginePath  # the path that serves this engine's requests

    def __init__(self, tokenizer, eos_ids: set[int], max_seq_len: int, scheduler: Scheduler,
                 thread_name: str, *, metrics: ServerMetrics | None = None,
                 output_policies: OutputPolicies | None = None, adapter_policy=None) -> None:
        """`metrics` and `output_policies`: the server's (server/app.py hands them in); by
        default a private, unserved metrics set and no global policy, for tests and
        benchmarks that build an engine in process. `adapter_policy`: an engine serving
        one adapter (ONNX): that adapter version's output policy."""
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len
        self.scheduler = scheduler
        self.metrics = metrics if metrics is not None else ServerMetrics(process_metrics=False)
        self.output_policies = (output_policies if output_policies is not None
                                else OutputPolicies())
        self.adapter_policy = adapter_policy
        self._thread_name = thread_name
        self._source = f"{thread_name}@{id(self):x}"  # this engine's share of the gauges
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # The requests accepted and not ended yet (their last event not sent), so that a
        # dying engine thread can end each of them; and why it died, once it has.
        self._live_lock = threading.Lock()
        self._live: set[RequestState] = set()
        self._died: str | None = None

    # ---- what other threads call ------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.scheduler.has_work.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.metrics.set_requests(0, 0, self._source)
        self.metrics.set_adapter_requests((), (), self._source)

    def idle(self) -> bool:
        running, waiting = self.scheduler.counts()
        return running == 0 and waiting == 0

    def health(self) -> EngineHealth:
        if self._died is not None:
            return EngineHealth(False, self._died)
        if self._thread is None:
            return EngineHealth(False, f"the {self.engine_path} engine has not started")
        if self._stopping.is_set():
            return EngineHealth(False, f"the {self.engine_path} engine is stopped")
        if not self._thread.is_alive():
            return EngineHealth(False, f"the {self.engine_path} engine thread has died "
                                "(see the log)")
        return EngineHealth(True)

    def route(self, adapter_id: str) -> Route:
        return Route(self.engine_path)

    def info(self) -> EngineInfo:
        raise NotImplementedError

    def memory(self) -> dict[str, int]:
        raise NotImplementedError

    def submit(self, req: GenerationRequest, engine_path: str = "") -> RequestHandle:
        """Queue `req`; raises EngineError (a gRPC status name) when it cannot be queued.
        `engine_path` "" or this engine's own; another is FAILED_PRECONDITION."""
        check_engine_path(engine_path)
        if engine_path and engine_path != self.engine_path:
            raise EngineError("FAILED_PRECONDITION", self._no_path(engine_path))

        def cancel() -> None:  # the handle is returned only once `seq` is bound
            seq.cancelled = True
            self.scheduler.has_work.set()

        state = self._new_state(req, cancel)
        seq = Sequence(req.request_id, list(req.prompt_ids), payload=state, deadline=req.deadline)
        with self._live_lock:  # live before it is queued: a thread dying from now on ends it
            if self._died is not None:
                raise EngineError("UNAVAILABLE", self._died)
            self._live.add(state)
        try:
            self.scheduler.submit(seq)
        except QueueFullError as e:
            with self._live_lock:
                self._live.discard(state)
            raise EngineError("RESOURCE_EXHAUSTED", str(e), cause="queue_full") from None
        return state.handle

    def warmup(self, adapter_id: str = "") -> None:
        """One short generation through the whole path before the server reports SERVING."""
        ids = self.tokenizer.encode("Hello")[:8] or [0]
        handle = self.submit(GenerationRequest("warmup", ids, adapter_id=adapter_id,
                                               stopping=StoppingParams(4, ignore_eos=True)))
        while True:
            ev = handle.events.get(timeout=300)
            if isinstance(ev, ErrorEvent):
                raise RuntimeError(f"{self.engine_path} warm-up failed: {ev.message}")
            if isinstance(ev, FinishEvent):
                return

    def _no_path(self, engine_path: str) -> str:
        if engine_path == ONNX:
            return ("engine_path ONNX: the ONNX path is not enabled on this server (start it "
                    "with --onnx)")
        return (f"engine_path {engine_path.upper()}: this engine serves the "
                f"{self.engine_path} path only")

    # ---- backend hooks ------------------------------------------------------------------
    def _new_state(self, req: GenerationRequest, cancel: Callable[[], None]) -> RequestState:
        """The request's state and handle (`cancel`: the handle's cancel)."""
        state = RequestState(req, self._handle(req, "", cancel), self._stream(req),
                             request_generator(req))
        state.guard = self._guard(self.adapter_policy)
        return state

    def _guard(self, adapter_policy):
        """The output policy a new request keeps for its whole life: the global rules, then
        its adapter version's (None when there are none)."""
        return self.output_policies.stream_for(adapter_policy)

    def _handle(self, req: GenerationRequest, adapter_version: str,
                cancel: Callable[[], None]) -> RequestHandle:
        return RequestHandle(req.request_id, req.adapter_id, adapter_version, self.engine_path,
                             req.events, cancel=cancel)

    def _stream(self, req: GenerationRequest) -> TextStream:
        return TextStream(self.tokenizer, req.stopping.stop_sequences)

    def _thread_init(self) -> None:
        """Called once on the engine thread before the first step."""

    def _can_admit(self, seq: Sequence) -> bool:
        return True

    def _forward(self, plan: StepPlan) -> tuple[list[Entry], torch.Tensor, int]:
        """Run the step: -> (entries whose next token it yields, their logits [n, vocab],
        tokens processed). Must leave the backend as it was when it raises, so that a
        part of the plan can be run again (row isolation)."""
        raise NotImplementedError

    def _release(self, seq: Sequence) -> None:
        """Free what the request's row holds in the backend (adapter slot, cache)."""

    def _deadline_error(self, seq: Sequence) -> ErrorEvent:
        waited = time.monotonic() - seq.payload.arrival
        where = "waiting" if seq.first_scheduled is None else "running"
        return ErrorEvent("DEADLINE_EXCEEDED", f"deadline exceeded after {waited:.3f}s with "
                          f"{len(seq.output_ids)} tokens generated ({where})")

    def _kv_usage(self) -> tuple[float, float] | None:
        """(KV rows taken / rows, tokens held / capacity), or None without a KV cache."""
        return None

    # ---- the engine thread --------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._thread_init()
            self._steps()
        except BaseException as e:  # a bug, not a request's failure: the thread ends here
            self._die(e)

    def _steps(self) -> None:
        while not self._stopping.is_set():
            if not self.scheduler.has_work.wait(timeout=0.5):
                continue
            plan = self.scheduler.schedule(self._can_admit)
            for seq in plan.dropped:
                self._finish_dropped(seq)
            if plan.entries:
                self._run_isolated(plan)
            elif not plan.dropped:
                time.sleep(0.001)  # waiting requests that cannot be admitted yet
                continue
            self._report_gauges()

    def _die(self, cause: BaseException) -> None:
        """The step loop raised: end every live request with UNAVAILABLE and the reason,
        refuse new ones (`submit`) and report it (`health`). The backend's state (rows,
        slots, cache) is not trusted any more, so nothing of it is released or reused."""
        reason = (f"the {self.engine_path} engine thread died ({type(cause).__name__}: "
                  f"{cause}); this server serves no more generations until it is restarted")
        log.critical("%s", reason, exc_info=cause)
        with self._live_lock:
            self._died = reason
            live, self._live = self._live, set()
        for state in live:
            state.handle.events.put(ErrorEvent("UNAVAILABLE", reason))
        self.metrics.set_requests(0, 0, self._source)
        self.metrics.set_adapter_requests((), (), self._source)

    def _end(self, state: RequestState, event: FinishEvent | ErrorEvent) -> None:
        """Send a request's last event (it is no longer live)."""
        with self._live_lock:
            self._live.discard(state)
        state.handle.events.put(event)

    def _run_isolated(self, plan: StepPlan) -> None:
        try:
            self._run(plan)
        except Exception:  # find the rows that fail on their own; the rest go on
            log.exception("%s engine step failed; isolating the failing rows", self.engine_path)
            _, failed = isolate(plan.entries, lambda part: self._run(StepPlan(part, [])))
            for entry, error in failed:
                self._fail(entry.seq, "INTERNAL", f"this request failed in the engine: "
                           f"{type(error).__name__}: {error}")

    def _run(self, plan: StepPlan) -> None:
        t0 = time.perf_counter()
        sampled, logits, num_tokens = self._forward(plan)
        self.scheduler.advance(plan)
        bad = nonfinite_rows(logits) if sampled else []
        for i in reversed(bad):  # a poisoned row fails its own request only
            e = sampled.pop(i)
            self._fail(e.seq, "INTERNAL", nonfinite_message(e.seq.payload.req.adapter_id))
        if bad and sampled:
            logits = logits[[i for i in range(logits.shape[0]) if i not in set(bad)]]
        if sampled:
            self._sample(sampled, logits)
        self.metrics.observe_step(len(plan.entries), num_tokens, time.perf_counter() - t0)

    def _sample(self, sampled: list[Entry], logits: torch.Tensor) -> None:
        logits = logits.cpu().float()  # as select_tokens would (a no-op for float32)
        sampled, logits = self._constrain(sampled, logits)
        if not sampled:
            return
        states: list[RequestState] = [e.seq.payload for e in sampled]
        params = [s.req.sampling for s in states]
        histories = [(e.seq.prompt_ids[s.virtual:] + e.seq.output_ids)
                     if p.repetition_penalty != 1.0 else None
                     for e, p, s in zip(sampled, params, states, strict=True)]
        outputs = [e.seq.output_ids if p.presence_penalty or p.frequency_penalty else None
                   for e, p in zip(sampled, params, strict=True)]
        tokens, logprobs, tops = select_tokens(
            logits, params, histories, [s.generator for s in states],
            [s.req.logprobs for s in states], outputs=outputs,
            top_logprobs=[s.req.top_logprobs for s in states])
        now = time.monotonic()
        for e, state, tok, lp, top in zip(sampled, states, tokens, logprobs, tops, strict=True):
            seq = e.seq
            grammar_done = False
            if state.matcher is not None:
                if not state.matcher.consume(tok):  # the mask allowed it: should not happen
                    self._fail(seq, "INTERNAL", f"structured output: the grammar rejected "
                               f"token {tok}: {state.matcher.error}")
                    continue
                grammar_done = state.matcher.done
            seq.output_ids.append(tok)
            if state.first_token is None:
                state.first_token = now
            else:
                self.metrics.observe_inter_token(now - state.last_token)
            state.last_token = now
            stop = state.req.stopping
            reason, text = None, ""
            if (tok in self.eos_ids and not stop.ignore_eos) or (
                    grammar_done and tok == state.matcher.eos_id):
                reason = FinishReason.EOS
            else:
                text = state.stream.push(tok)
                if state.stream.stopped:
                    reason = FinishReason.STOP_SEQUENCE
                elif grammar_done:  # the answer is complete: end it as EOS would
                    reason = FinishReason.EOS
            ids, lps = [tok], [lp] if lp is not None else []
            tops = [top] if top is not None else []
            if state.guard is not None:  # after detokenization, before the text leaves
                text, items = state.guard.push(text, (tok, lp, top))
                ids, lps, tops = _split(items)
                if state.guard.stopped:
                    reason = FinishReason.FILTERED
            if reason is None and (len(seq.output_ids) >= stop.max_new_tokens
                                   or seq.num_tokens >= self.max_seq_len):
                reason = FinishReason.LENGTH
            state.handle.events.put(TokenEvent(text, ids, lps, tops))
            if reason is not None:
                self._finish(seq, reason)

    def _constrain(self, sampled: list[Entry], logits: torch.Tensor
                   ) -> tuple[list[Entry], torch.Tensor]:
        """Structured output: mask the constrained rows' logits to their grammars (in
        place; free rows untouched); a row whose matcher fails fails alone."""
        rows = [(i, e.seq.payload.matcher) for i, e in enumerate(sampled)
                if e.seq.payload.matcher is not None]
        failed = mask_logits(logits, rows) if rows else []
        if not failed:
            return sampled, logits
        for i in failed:
            state: RequestState = sampled[i].seq.payload
            self._fail(sampled[i].seq, "INTERNAL", "structured output: the grammar allows no "
                       f"next token ({state.matcher.error or 'no token of the vocabulary fits'})")
        gone = set(failed)
        keep = [i for i in range(len(sampled)) if i not in gone]
        return [sampled[i] for i in keep], logits[keep]

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        state: RequestState = seq.payload
        self.scheduler.finish(seq)
        self._release(seq)
        now = time.monotonic()
        timings = Timings(
            queue_seconds=(seq.first_scheduled or now) - state.arrival,
            time_to_first_token_seconds=(state.first_token or now) - state.arrival,
            total_seconds=now - state.arrival,
        )
        stopped = reason in (FinishReason.STOP_SEQUENCE, FinishReason.FILTERED)
        tail = "" if stopped else state.stream.flush()
        ids: list[int] = []
        lps: list[float] = []
        tops: list = []
        rules: tuple[str, ...] = ()
        guard = state.guard
        if guard is not None:  # the end of the text: decide what was held back
            text, items = guard.push(tail) if tail else ("", [])
            end, more = guard.finish()
            tail = text + end
            ids, lps, tops = _split(items + more)
            if guard.stopped:
                reason = FinishReason.FILTERED
            rules = tuple(guard.hits)
            if rules:
                self._report_filtered(state, rules, guard.stop_rule)
        self._end(state, FinishEvent(reason, len(seq.prompt_ids) - state.virtual,
                                     len(seq.output_ids), timings, tail, ids, lps,
                                     bool(rules), rules, tops,
                                     cached_tokens=state.cached_tokens))

    def _report_filtered(self, state: RequestState, rules: tuple[str, ...],
                         stop_rule: str) -> None:
        """Log and count a filtered response: rule names and adapter, never the text."""
        req = state.req
        log.info("output policy: request %s adapter %r version %s: %s by rule %s%s",
                 req.request_id, req.adapter_id, state.handle.adapter_version or "-",
                 "stopped" if stop_rule else "redacted", stop_rule or ", ".join(rules),
                 f" (also {', '.join(r for r in rules if r != stop_rule)})"
                 if stop_rule and len(rules) > 1 else "")
        self.metrics.response_filtered(req.adapter_id, rules, stopped=bool(stop_rule))

    def _finish_dropped(self, seq: Sequence) -> None:
        """A request the scheduler removed: cancelled, past its deadline, or failed."""
        state: RequestState = seq.payload
        self._release(seq)
        if state.error is not None:
            self._end(state, ErrorEvent(*state.error))
        elif seq.cancelled:
            timings = Timings(total_seconds=time.monotonic() - state.arrival)
            self._end(state, FinishEvent(
                FinishReason.CANCELLED, len(seq.prompt_ids) - state.virtual,
                len(seq.output_ids), timings))
        else:
            self._end(state, self._deadline_error(seq))

    def _drop(self, seq: Sequence, code: str, message: str) -> None:
        """Fail a waiting request at the next step (the scheduler removes it)."""
        seq.payload.error = (code, message)
        seq.cancelled = True

    def _fail(self, seq: Sequence, code: str, message: str) -> None:
        self.scheduler.finish(seq)
        self._release(seq)
        self._end(seq.payload, ErrorEvent(code, message))

    def _report_gauges(self) -> None:
        running, waiting = self.scheduler.payloads()
        self.metrics.set_requests(len(running), len(waiting), self._source)
        self.metrics.set_adapter_requests([s.req.adapter_id for s in running],
                                          [s.req.adapter_id for s in waiting], self._source)
        usage = self._kv_usage()
        if usage is not None:
            self.metrics.set_kv_cache_usage(*usage)


def _split(items: list[tuple]) -> tuple[list[int], list[float], list]:
    """Released (token id, logprob, top logprobs) -> ids, logprobs, top logprobs (the
    last two empty when not asked for)."""
    return ([t for t, _, _ in items], [lp for _, lp, _ in items if lp is not None],
            [top for _, _, top in items if top is not None])


def request_generator(req: GenerationRequest) -> torch.Generator | None:
    """The request's own random stream (seeded when it names a seed); None for greedy."""
    if req.sampling.greedy:
        return None
    seed = req.sampling.seed
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device="cpu").manual_seed(seed)
