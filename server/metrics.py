"""Prometheus metrics for the server.

`ServerMetrics` owns one `CollectorRegistry` (its own by default, so tests can build
several) and exposes one method per event the server reports. Every name carries the
`switchboard_` prefix; units are seconds, bytes, tokens and ratios (0..1).

Adapter labels are bounded: the base model is `__base__`, at most `max_adapter_labels`
adapters keep their own label, everything else is `__other__`. Which adapters keep a
label follows traffic (`AdapterLabeler`): a new adapter takes a free label, and once the
labels are full an adapter whose recent traffic is `hysteresis` times that of the
quietest labelled adapter takes that adapter's label. The demoted adapter's series are
removed, so the series count stays bounded; `sum(rate(...))` is unaffected because rate
is taken per series before the sum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"
MAX_RULE_LABELS = 64  # output-policy rule names with a label of their own

# gRPC status code names (grpc.StatusCode); anything else is reported as UNKNOWN so that
# the `code` label cannot grow without bound.
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

# Buckets sized for LLM serving on anything from a 2-core CPU to a datacenter GPU.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0, 180.0, 240.0, 300.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
STEP_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
STEP_TOKENS_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192
REQUEST_TOKENS_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
)  # fmt: skip
PHASE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
# Why a call ended in RESOURCE_EXHAUSTED: the engine's queue was full (--max-queue), the
# API key had its concurrent calls (max_concurrent), or no adapter slot came free before
# the deadline (--max-active-adapters). Anything else is "other".
EXHAUSTED_CAUSES = frozenset({"queue_full", "key_concurrency", "adapter_slots", "other"})
# The services whose refused calls the security interceptor counts.
SERVICES = frozenset({"TextGeneration", "AdapterAdmin"})
ADAPTER_LOAD_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class AdapterLabeler:
    """Keeps the top `max_labels` adapters by recent traffic, with stable labels.

    Traffic is a count that halves every `half_life_s` seconds. Unlabelled adapters are
    tracked in a table of at most `max_tracked` entries with the Space-Saving rule (a
    newcomer replaces the quietest entry and inherits its count as an error bound), so a
    flood of distinct ids costs bounded memory, and a promotion uses the guaranteed part
    of the count (count - error). Not thread-safe: `ServerMetrics` holds a lock.
    """

    def __init__(
        self,
        max_labels: int,
        *,
        max_tracked: int | None = None,
        half_life_s: float = 600.0,
        hysteresis: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_labels < 0:
            raise ValueError(f"max_adapter_labels must be >= 0, got {max_labels}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        if hysteresis < 1.0:
            raise ValueError(f"hysteresis must be >= 1.0, got {hysteresis}")
        self.max_labels = max_labels
        self.max_tracked = max_tracked if max_tracked is not None else max(4 * max_labels, 64)
        if self.max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, got {self.max_tracked}")
        self.half_life_s = half_life_s
        self.hysteresis = hysteresis
        self._clock = clock
        self._last_decay = clock()
        self._labelled: dict[str, float] = {}  # adapter_id -> traffic
        self._candidates: dict[str, list[float]] = {}  # adapter_id -> [traffic, error]

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)

    def label(self, adapter_id: str) -> str:
        """The label for `adapter_id`; takes a free label if one is left."""
        if adapter_id == "":
            return BASE_LABEL
        if adapter_id in (BASE_LABEL, OTHER_LABEL):
            return OTHER_LABEL
        if adapter_id in self._labelled:
            return adapter_id
        if len(self._labelled) < self.max_labels:
            count, _ = self._candidates.pop(adapter_id, [0.0, 0.0])
            self._labelled[adapter_id] = count
            return adapter_id
        return OTHER_LABEL

    def current(self, adapter_id: str) -> str:
        """The label `adapter_id` has now; never takes a free one."""
        if adapter_id == "":
            return BASE_LABEL
        return adapter_id if adapter_id in self._labelled else OTHER_LABEL

    def record(self, adapter_id: str, weight: float = 1.0) -> str | None:
        """Counts traffic for `adapter_id`. Returns the adapter id that lost its label to
        it, if one did (its series should then be removed)."""
        if adapter_id == "" or adapter_id in (BASE_LABEL, OTHER_LABEL):
            return None
        self._decay()
        if adapter_id in self._labelled:
            self._labelled[adapter_id] += weight
            return None
        if self.label(adapter_id) == adapter_id:
            self._labelled[adapter_id] += weight
            return None
        entry = self._candidates.get(adapter_id)
        if entry is None:
            entry = self._admit_candidate(adapter_id)
        entry[0] += weight
        if not self._labelled:
            return None
        quietest = min(self._labelled, key=self._labelled.__getitem__)
        guaranteed = entry[0] - entry[1]
        if guaranteed <= self.hysteresis * self._labelled[quietest]:
            return None
        # Swap: the quietest labelled adapter becomes a candidate (its count is exact).
        quiet_count = self._labelled.pop(quietest)
        del self._candidates[adapter_id]
        self._labelled[adapter_id] = entry[0]
        self._candidates[quietest] = [quiet_count, 0.0]
        self._trim_candidates()
        return quietest

    def forget(self, adapter_id: str) -> bool:
        """Drops `adapter_id` (e.g. unloaded). Returns whether it had a label."""
        self._candidates.pop(adapter_id, None)
        return self._labelled.pop(adapter_id, None) is not None

    def _admit_candidate(self, adapter_id: str) -> list[float]:
        inherited = 0.0
        if len(self._candidates) >= self.max_tracked:
            quietest = min(self._candidates, key=lambda a: self._candidates[a][0])
            inherited = self._candidates.pop(quietest)[0]
        entry = [inherited, inherited]
        self._candidates[adapter_id] = entry
        return entry

    def _trim_candidates(self) -> None:
        while len(self._candidates) > self.max_tracked:
            quietest = min(self._candidates, key=lambda a: self._candidates[a][0])
            del self._candidates[quietest]

    def _decay(self) -> None:
        now = self._clock()
        half_lives = int((now - self._last_decay) / self.half_life_s)
        if half_lives <= 0:
            return
        self._last_decay += half_lives * self.half_life_s
        factor = 0.5 ** min(half_lives, 64)
        for adapter_id in self._labelled:
            self._labelled[adapter_id] *= factor
        for entry in self._candidates.values():
            entry[0] *= factor
            entry[1] *= factor


class ServerMetrics:
    """All server metrics, in one registry. Methods are thread-safe and cheap."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_adapter_labels: int = 32,
        *,
        process_metrics: bool | None = None,
        created_series: bool = False,
        label_half_life_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        memory_source: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """`process_metrics` adds the process_*/python_* collectors (default: only when
        the registry is our own). `created_series=False` turns off the `*_created`
        samples for the whole process (prometheus_client keeps that switch global).
        `memory_source`: the bytes held per part (`Engine.memory`), read at every scrape
        (adapters come and go); without it only what `set_memory` sets is exported."""
        if not created_series:
            prometheus_client.disable_created_metrics()
        own_registry = registry is None
        self.registry = CollectorRegistry() if registry is None else registry
        if process_metrics is None:
            process_metrics = own_registry
        if process_metrics:
            _register_process_collectors(self.registry)
        self._lock = threading.Lock()
        self._labeler = AdapterLabeler(
            max_adapter_labels, half_life_s=label_half_life_s, clock=clock
        )
        self._httpd: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        r = self.registry
        self._request_counts: dict[str, tuple[int, int]] = {}

        # Requests.
        self.requests_total = Counter(
            "switchboard_requests", "Finished requests by adapter and gRPC status code.",
            ["adapter", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "switchboard_request_duration_seconds",
            "End-to-end latency of requests the engine accepted, from arrival to their end "
            "(last token, cancel, deadline or failure); refused requests observe nothing.",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.finished_total = Counter(
            "switchboard_requests_finished", "Requests that ended with a finish reason "
            "(length, eos, stop_sequence, cancelled, ...).",
            ["finish_reason"], registry=r,
        )  # fmt: skip
        self.resource_exhausted_total = Counter(
            "switchboard_resource_exhausted", "Calls refused with RESOURCE_EXHAUSTED, by "
            "cause: queue_full, key_concurrency, adapter_slots, other.",
            ["cause"], registry=r,
        )  # fmt: skip
        self.rejected_calls_total = Counter(
            "switchboard_rejected_calls", "Calls the security interceptor refused before "
            "any handler ran (keys, permissions, per-key limit, draining), by service and code.",
            ["service", "code"], registry=r,
        )  # fmt: skip
        self.prefill_time = Histogram(
            "switchboard_request_prefill_seconds",
            "Per request: from its first scheduling to its first token (prompt processing).",
            buckets=PHASE_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_time = Histogram(
            "switchboard_request_decode_seconds",
            "Per request: from its first token to its last (the decode phase).",
            buckets=PHASE_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "switchboard_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "switchboard_inter_token_latency_seconds",
            "Time between two consecutive tokens of one request.",
            buckets=INTER_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "switchboard_queue_wait_seconds",
            "Time a request waited in the queue before its prefill was scheduled.",
            buckets=QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens_total = Counter(
            "switchboard_prompt_tokens", "Prompt tokens of finished requests by adapter.",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.generated_tokens_total = Counter(
            "switchboard_generated_tokens", "Generated tokens of finished requests by adapter.",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.request_prompt_tokens = Histogram(
            "switchboard_request_prompt_tokens", "Prompt length of finished requests.",
            buckets=REQUEST_TOKENS_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_generated_tokens = Histogram(
            "switchboard_request_generated_tokens", "Generated length of finished requests.",
            buckets=REQUEST_TOKENS_BUCKETS, registry=r,
        )  # fmt: skip
        # Output policies (docs/security.md): rule names are bounded like adapter ids.
        self.filtered_responses_total = Counter(
            "switchboard_filtered_responses",
            "Responses an output policy changed, by adapter and action (redact or stop).",
            ["adapter", "action"], registry=r,
        )  # fmt: skip
        self.filtered_rule_total = Counter(
            "switchboard_filtered_responses_by_rule",
            "Responses an output-policy rule matched in, by adapter and rule name (a response "
            "counts once under each rule it tripped).",
            ["adapter", "rule"], registry=r,
        )  # fmt: skip
        self._rule_labels: set[str] = set()
        self.requests_running = Gauge(
            "switchboard_requests_running", "Requests in the running batch.", registry=r
        )
        self.requests_waiting = Gauge(
            "switchboard_requests_waiting", "Requests waiting in the queue.", registry=r
        )

        # Engine steps and KV cache.
        self.batch_size = Histogram(
            "switchboard_batch_size", "Requests (rows) per engine step.",
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_tokens = Histogram(
            "switchboard_step_tokens", "Tokens processed per engine step (prefill + decode).",
            buckets=STEP_TOKENS_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_duration = Histogram(
            "switchboard_step_duration_seconds", "Wall time of one engine step.",
            buckets=STEP_SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.kv_cache_usage = Gauge(
            "switchboard_kv_cache_usage_ratio", "Fraction of the KV-cache rows taken by "
            "running requests (0..1); admission needs a free row, so 1 means none is left.",
            registry=r,
        )  # fmt: skip
        self.kv_cache_tokens = Gauge(
            "switchboard_kv_cache_tokens_ratio", "Tokens held in the KV cache over its "
            "capacity (rows x max sequence length), 0..1: how full the taken rows are.",
            registry=r,
        )  # fmt: skip
        self.prefix_cache_queried_tokens = Counter(
            "switchboard_prefix_cache_queried_tokens", "Prompt tokens of admitted requests "
            "looked up in the prefix cache.",
            registry=r,
        )  # fmt: skip
        self.prefix_cache_hit_tokens = Counter(
            "switchboard_prefix_cache_hit_tokens", "Prompt tokens whose keys and values came "
            "from the prefix cache instead of being computed.",
            registry=r,
        )  # fmt: skip

        # Structured output.
        self.grammar_compiles_total = Counter(
            "switchboard_grammar_compiles",
            "Response formats asked for, by result: compiled, cached (the compile cache "
            "had it) or invalid.", ["result"], registry=r,
        )  # fmt: skip

        # Adapters.
        self.adapter_loads_total = Counter(
            "switchboard_adapter_loads", "Adapter loads into a tier.", ["tier"], registry=r
        )
        self.adapter_load_duration = Histogram(
            "switchboard_adapter_load_duration_seconds", "Time to load an adapter into a tier.",
            ["tier"], buckets=ADAPTER_LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.adapter_evictions_total = Counter(
            "switchboard_adapter_evictions", "Adapter evictions from a tier.", ["tier"],
            registry=r,
        )  # fmt: skip
        self.adapters_resident = Gauge(
            "switchboard_adapters_resident", "Adapters resident in a tier.", ["tier"],
            registry=r,
        )  # fmt: skip

        self.adapter_slots = Gauge(
            "switchboard_adapter_slots", "Adapter slots on the device (--max-active-adapters).",
            registry=r,
        )  # fmt: skip
        self.adapters_running = Gauge(
            "switchboard_adapters_running", "Distinct adapters with a running request.",
            registry=r,
        )  # fmt: skip
        self.adapters_waiting = Gauge(
            "switchboard_adapters_waiting", "Distinct adapters with a waiting request and "
            "none running.", registry=r,
        )  # fmt: skip
        self.lora_requests_info = Gauge(
            "switchboard_lora_requests_info", "One series, replaced on change (value: Unix "
            "time of the change): the adapters running and waiting, comma-separated and "
            "capped at max_lora ids each, and the slot count (vLLM's lora_requests_info).",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r,
        )  # fmt: skip
        self._adapter_requests: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._lora_info_labels: tuple[str, str, str] | None = None
        self._slots = 0

        # Memory and identity: read from `memory_source` at each scrape.
        self.memory_bytes = _PartsGauge(
            "switchboard_memory_bytes", "Memory held by a part of the server.", "part",
            memory_source,
        )
        r.register(self.memory_bytes)
        self.build_info = Info(
            "switchboard_build", "Server version and the model it serves.", registry=r
        )

    # -- adapters' labels ------------------------------------------------------------

    def adapter_label(self, adapter_id: str) -> str:
        """The bounded label value for `adapter_id` ("" is the base model)."""
        with self._lock:
            return self._labeler.label(adapter_id)

    def labelled_adapters(self) -> frozenset[str]:
        with self._lock:
            return self._labeler.labelled

    def forget_adapter(self, adapter_id: str) -> None:
        """Frees `adapter_id`'s label (call on unload) and removes its series."""
        with self._lock:
            if self._labeler.forget(adapter_id):
                self._remove_adapter_series(adapter_id)

    def _remove_adapter_series(self, label: str) -> None:
        for metric in (self.requests_total, self.prompt_tokens_total, self.generated_tokens_total,
                       self.filtered_responses_total, self.filtered_rule_total):
            metric.remove_by_labels({"adapter": label})

    # -- requests ----------------------------------------------------------------------

    def request_started(self, adapter_id: str) -> None:
        """Call once per request on arrival: counts its adapter's traffic for labels."""
        with self._lock:
            demoted = self._labeler.record(adapter_id)
            if demoted is not None:
                logger.info("metrics: adapter %r takes the label of %r", adapter_id, demoted)
                self._remove_adapter_series(demoted)

    def request_finished(
        self,
        adapter_id: str,
        code: str,
        e2e_seconds: float | None,
        ttft_seconds: float | None,
        queue_seconds: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        finish_reason: str | None = None,
        prefill_seconds: float | None = None,
        decode_seconds: float | None = None,
        cause: str | None = None,
    ) -> None:
        """Call once per request when its response (or error) is sent. `code` is a gRPC
        status name ("OK", "NOT_FOUND", ...); timings that did not happen are None and
        observe nothing (a request refused at the door has no end-to-end latency).
        `finish_reason` names how a generation ended; `cause` why it was
        RESOURCE_EXHAUSTED. Only `request_started` grants labels, so a request refused
        before it started (say, NOT_FOUND for a made-up adapter id) counts under
        `__other__`."""
        code = code.upper() if code.upper() in GRPC_CODES else "UNKNOWN"
        with self._lock:
            label = self._labeler.current(adapter_id)
            self.requests_total.labels(label, code).inc()
            if prompt_tokens > 0:
                self.prompt_tokens_total.labels(label).inc(prompt_tokens)
            if completion_tokens > 0:
                self.generated_tokens_total.labels(label).inc(completion_tokens)
        if code == "RESOURCE_EXHAUSTED":
            self.resource_exhausted(cause or "other")
        if finish_reason:
            self.finished_total.labels(finish_reason).inc()
        for histogram, seconds in (
            (self.request_duration, e2e_seconds), (self.time_to_first_token, ttft_seconds),
            (self.queue_wait, queue_seconds), (self.prefill_time, prefill_seconds),
            (self.decode_time, decode_seconds),
        ):  # fmt: skip
            if seconds is not None:
                histogram.observe(max(0.0, seconds))
        if code == "OK":
            self.request_prompt_tokens.observe(max(0, prompt_tokens))
            self.request_generated_tokens.observe(max(0, completion_tokens))

    def response_filtered(self, adapter_id: str, rules: Iterable[str], *,
                          stopped: bool) -> None:
        """A response an output policy changed: `rules` are the names of the rules that
        matched in it. At most MAX_RULE_LABELS rule names keep a label (first come); the
        others count under `__other__`."""
        with self._lock:
            label = self._labeler.current(adapter_id)
            self.filtered_responses_total.labels(label, "stop" if stopped else "redact").inc()
            for rule in dict.fromkeys(rules):
                if rule not in self._rule_labels and len(self._rule_labels) < MAX_RULE_LABELS:
                    self._rule_labels.add(rule)
                name = rule if rule in self._rule_labels else OTHER_LABEL
                self.filtered_rule_total.labels(label, name).inc()

    def resource_exhausted(self, cause: str) -> None:
        """A call refused with RESOURCE_EXHAUSTED (one of EXHAUSTED_CAUSES)."""
        self.resource_exhausted_total.labels(cause if cause in EXHAUSTED_CAUSES else "other").inc()

    def call_rejected(self, service: str, code: str, adapter_id: str | None = None) -> None:
        """The security interceptor refused a call of `service` ("TextGeneration",
        "AdapterAdmin") with `code`. A generation call (`adapter_id` not None) also counts
        as a finished request, with no latency; RESOURCE_EXHAUSTED there is a key's
        concurrency limit."""
        code = code.upper() if code.upper() in GRPC_CODES else "UNKNOWN"
        self.rejected_calls_total.labels(service if service in SERVICES else "other", code).inc()
        if adapter_id is not None:
            self.request_finished(adapter_id, code, None, None, None, 0, 0,
                                  cause="key_concurrency")

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(max(0.0, seconds))

    def set_requests(self, running: int, waiting: int, source: str = "") -> None:
        """Running and waiting requests of one engine (`source`); the gauges show the sum
        over the engines (the PyTorch engine and any ONNX sessions), so they never flap
        between one engine's counts and another's."""
        with self._lock:
            if running or waiting:
                self._request_counts[source] = (running, waiting)
            else:
                self._request_counts.pop(source, None)
            counts = list(self._request_counts.values())
        self.requests_running.set(sum(r for r, _ in counts))
        self.requests_waiting.set(sum(w for _, w in counts))

    # -- engine --------------------------------------------------------------------------

    def observe_step(self, batch_size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_tokens.observe(tokens)
        self.step_duration.observe(max(0.0, seconds))

    def prefix_cache_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_queried_tokens.inc(prompt_tokens)
        self.prefix_cache_hit_tokens.inc(hit_tokens)

    def set_kv_cache_usage(self, used_fraction: float, tokens_fraction: float | None = None
                           ) -> None:
        """Rows taken over rows; optionally tokens held over rows x max length."""
        self.kv_cache_usage.set(min(1.0, max(0.0, used_fraction)))
        if tokens_fraction is not None:
            self.kv_cache_tokens.set(min(1.0, max(0.0, tokens_fraction)))

    def set_adapter_requests(self, running: Iterable[str], waiting: Iterable[str],
                             source: str = "") -> None:
        """Adapter ids (base model "" left out) of one engine's running and waiting
        requests; summed over engines like `set_requests`. Updates the counts and replaces
        the one `switchboard_lora_requests_info` series when the sets change."""
        run = frozenset(a for a in running if a)
        wait = frozenset(a for a in waiting if a)
        with self._lock:
            if run or wait:
                self._adapter_requests[source] = (run, wait)
            else:
                self._adapter_requests.pop(source, None)
            all_run = frozenset().union(*(r for r, _ in self._adapter_requests.values()))
            all_wait = frozenset().union(*(w for _, w in self._adapter_requests.values()))
            all_wait -= all_run
            self.adapters_running.set(len(all_run))
            self.adapters_waiting.set(len(all_wait))
            self._publish_lora_info(all_run, all_wait)

    def set_adapter_slots(self, slots: int) -> None:
        with self._lock:
            self.adapter_slots.set(slots)
            self._slots = slots
            self._publish_lora_info(frozenset(), frozenset(), force=True)

    def _publish_lora_info(self, running: frozenset[str], waiting: frozenset[str],
                           force: bool = False) -> None:
        cap = max(self._slots, 1)  # bounded label values: at most `slots` ids each
        labels = (",".join(sorted(running)[:cap]), ",".join(sorted(waiting)[:cap]),
                  str(self._slots))
        if labels == self._lora_info_labels and not force:
            return
        if self._lora_info_labels is not None:
            self.lora_requests_info.remove(*self._lora_info_labels)
        self.lora_requests_info.labels(*labels).set(time.time())
        self._lora_info_labels = labels

    # -- adapter tiers ---------------------------------------------------------------------

    def grammar_compiled(self, result: str) -> None:
        self.grammar_compiles_total.labels(result).inc()

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        """An adapter was loaded into `tier` ("device", "host" or "disk")."""
        self.adapter_loads_total.labels(tier).inc()
        self.adapter_load_duration.labels(tier).observe(max(0.0, seconds))

    def adapter_evicted(self, tier: str) -> None:
        self.adapter_evictions_total.labels(tier).inc()

    def set_resident_adapters(self, tier: str, count: int) -> None:
        self.adapters_resident.labels(tier).set(count)

    # -- memory and identity ---------------------------------------------------------------

    def set_memory(self, part: str, nbytes: int) -> None:
        """Bytes held by `part` ("base_model", "kv_cache", "adapters_host", ...)."""
        self.memory_bytes.values[part] = nbytes

    def set_info(
        self, version: str, model_id: str, dtype: str, device: str, quantization: str
    ) -> None:
        self.build_info.info(
            {
                "version": version,
                "model_id": model_id,
                "dtype": dtype,
                "device": device,
                "quantization": quantization,
            }
        )

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as a scrape would see it."""
        return prometheus_client.generate_latest(self.registry)

    def metric_names(self) -> frozenset[str]:
        """Every sample name the registry can expose (families plus _bucket, _sum, ...)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(_sample_names(family.name, family.type))
            names.update(sample.name for sample in family.samples)
        return frozenset(names)

    def start_http_server(self, host: str, port: int) -> int:
        """Serves the registry on http://host:port/metrics; returns the bound port."""
        if self._httpd is not None:
            raise RuntimeError(f"metrics server already running on port {self.port}")
        httpd, thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        self._httpd, self._http_thread = httpd, thread
        logger.info("metrics on http://%s:%d/metrics", host, httpd.server_port)
        return httpd.server_port

    @property
    def port(self) -> int | None:
        return None if self._httpd is None else self._httpd.server_port

    def stop_http_server(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._httpd = self._http_thread = None


class _PartsGauge:
    """A gauge by one label whose values are read at scrape time from `source` (plus any
    set in `values`); a source that fails leaves the last good values in the scrape."""

    def __init__(self, name: str, documentation: str, label: str,
                 source: Callable[[], dict[str, int]] | None = None) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.values: dict[str, float] = {}
        self.source = source

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=[self.label])

    def describe(self):
        yield self._family()

    def collect(self):
        if self.source is not None:
            try:
                self.values.update(self.source())
            except Exception:  # a scrape must not fail on it
                logger.exception("metrics: reading %s failed", self.name)
        family = self._family()
        for part, value in sorted(self.values.items()):
            family.add_metric([part], float(value))
        yield family


def _sample_names(family: str, kind: str) -> Iterable[str]:
    if kind == "counter":
        return (family + "_total",)
    if kind == "histogram":
        return (family + "_bucket", family + "_sum", family + "_count")
    if kind == "summary":
        return (family + "_sum", family + "_count")
    if kind == "info":
        return (family + "_info",)
    return (family,)


def _register_process_collectors(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
