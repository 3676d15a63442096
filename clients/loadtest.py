"""Load generator: `run_loadtest(LoadTestConfig(...)) -> LoadTestResult`.

Closed loop (`concurrency` workers, each sending its next request when the previous one
ends) or open loop (`rate` requests/s with Poisson arrivals, independent of responses).
Stops after `duration_s` or `num_requests`, whichever comes first; requests in flight at
the end are allowed to finish. Streaming (default) measures time to first token and
inter-token latency from chunk arrival times.

It runs on one asyncio event loop with the grpc.aio client. The result reports the
generator's own CPU use (process CPU seconds over wall seconds, gRPC threads included)
and, in open loop, how late requests left compared to their Poisson schedule: a high
CPU share or send lag means the generator, not the server, is the bottleneck.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .aio import AsyncSwitchboardClient
from .errors import SwitchboardError
from .provenance import provenance
from .routing import DEFAULT_TARGET
from .stats import LatencySummary, summarize
from .workload import (
    DISTRIBUTIONS,
    AdapterMix,
    Prompt,
    builtin_prompts,
    load_prompts_file,
    load_weights_file,
)


@dataclass(frozen=True)
class LoadTestConfig:
    target: str | tuple[str, ...] = DEFAULT_TARGET
    concurrency: int = 4  # closed loop: number of workers (ignored when rate is set)
    rate: float | None = None  # open loop: mean requests/s (Poisson arrivals)
    duration_s: float | None = 30.0
    num_requests: int | None = None
    adapters: tuple[str, ...] = ("",)  # "" = base model
    distribution: str = "uniform"  # uniform, zipf, weights
    zipf_exponent: float = 1.0
    weights_file: str | None = None  # for distribution="weights"
    prompts_file: str | None = None  # JSONL; None = built-in chat prompts
    max_new_tokens: int = 64
    ignore_eos: bool = False
    temperature: float = 0.0
    stream: bool = True
    seed: int = 0  # for the adapter, prompt and arrival sampling
    timeout_s: float | None = 300.0  # per request
    max_in_flight: int = 1024  # open loop cap; beyond it sends wait (and lag is recorded)
    progress: bool = True  # live line on stderr
    api_key: str | None = None
    client_options: dict[str, Any] = field(default_factory=dict)  # tls etc. for the client

    def __post_init__(self) -> None:
        if self.rate is None and self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency} must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate {self.rate} must be > 0 requests/s")
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("set duration_s or num_requests (or both)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s {self.duration_s} must be > 0")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests {self.num_requests} must be at least 1")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution {self.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
            )
        if self.distribution == "weights" and not self.weights_file:
            raise ValueError("distribution 'weights' needs weights_file")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} must be at least 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadTestConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown load test settings: {', '.join(unknown)}")
        data = dict(data)
        for key in ("adapters",):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        if isinstance(data.get("target"), list):
            data["target"] = tuple(data["target"])
        return cls(**data)

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def adapter_mix(self) -> AdapterMix:
        if self.distribution == "weights":
            assert self.weights_file is not None
            return AdapterMix.from_weights(load_weights_file(self.weights_file))
        if self.distribution == "zipf":
            return AdapterMix.zipf(self.adapters, self.zipf_exponent)
        return AdapterMix.uniform(self.adapters)

    def prompt_set(self) -> list[Prompt]:
        return load_prompts_file(self.prompts_file) if self.prompts_file else builtin_prompts()


@dataclass
class RequestRecord:
    """One request; times in seconds, `start` relative to the start of the test."""

    start: float
    adapter_id: str
    prompt_index: int
    status: str = "OK"  # gRPC status code name, or CLIENT_ERROR
    error: str = ""
    e2e: float | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    send_lag: float = 0.0  # open loop: actual minus scheduled start
    endpoint: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass
class LoadTestResult:
    config: LoadTestConfig
    wall_s: float
    requests_ok: int
    requests_failed: int
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens: int
    output_tokens: int
    ttft: LatencySummary
    itl: LatencySummary
    e2e: LatencySummary
    send_lag: LatencySummary
    errors_by_code: dict[str, int]
    requests_by_adapter: dict[str, int]
    requests_by_endpoint: dict[str, int]
    client_cpu_fraction: float  # process CPU seconds / wall seconds (1.0 = one core)
    records: list[RequestRecord]

    def to_dict(self, *, include_records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            **provenance(),
            "config": dataclasses.asdict(self.config),
            "wall_s": self.wall_s,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_s": self.ttft.to_dict(),
            "itl_s": self.itl.to_dict(),
            "e2e_s": self.e2e.to_dict(),
            "send_lag_s": self.send_lag.to_dict(),
            "errors_by_code": self.errors_by_code,
            "requests_by_adapter": self.requests_by_adapter,
            "requests_by_endpoint": self.requests_by_endpoint,
            "client_cpu_fraction": self.client_cpu_fraction,
        }
        out["config"].pop("api_key", None)
        if include_records:
            out["records"] = [dataclasses.asdict(r) for r in self.records]
        return out

    def write_json(self, path: str | Path, *, include_records: bool = False) -> None:
        Path(path).write_text(
            json.dumps(self.to_dict(include_records=include_records), indent=2) + "\n"
        )


def build_result(
    config: LoadTestConfig, records: list[RequestRecord], wall_s: float, cpu_s: float
) -> LoadTestResult:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    wall = max(wall_s, 1e-9)
    return LoadTestResult(
        config=config,
        wall_s=wall_s,
        requests_ok=len(ok),
        requests_failed=len(records) - len(ok),
        requests_per_s=len(ok) / wall,
        output_tokens_per_s=out_tokens / wall,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=out_tokens,
        ttft=summarize([r.ttft for r in ok if r.ttft is not None]),
        itl=summarize([x for r in ok for x in r.itl]),
        e2e=summarize([r.e2e for r in ok if r.e2e is not None]),
        send_lag=summarize([r.send_lag for r in records]),
        errors_by_code=dict(Counter(r.status for r in records if not r.ok).most_common()),
        requests_by_adapter=dict(Counter(r.adapter_id for r in records).most_common()),
        requests_by_endpoint=dict(Counter(r.endpoint for r in ok).most_common()),
        client_cpu_fraction=cpu_s / wall,
        records=sorted(records, key=lambda r: r.start),
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def format_summary(result: LoadTestResult) -> str:
    c = result.config
    load = f"open loop, {c.rate:g} req/s" if c.rate is not None else (
        f"closed loop, concurrency {c.concurrency}")
    target = c.target if isinstance(c.target, str) else ",".join(c.target)
    lines = [
        f"load test: {target}, {load}, {len(c.adapters)} adapter(s) {c.distribution}, "
        f"max_new_tokens {c.max_new_tokens}{', ignore_eos' if c.ignore_eos else ''}, "
        f"{'streaming' if c.stream else 'unary'}",
        f"requests: {result.requests_ok} ok, {result.requests_failed} failed in "
        f"{result.wall_s:.1f} s",
        f"throughput: {result.requests_per_s:.2f} requests/s, "
        f"{result.output_tokens_per_s:.1f} output tokens/s "
        f"({result.output_tokens} output, {result.prompt_tokens} prompt tokens)",
        "",
        f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}"
        f"{'n':>8}",
    ]
    rows = [("TTFT", result.ttft), ("inter-token", result.itl), ("end-to-end", result.e2e)]
    if c.rate is not None:
        rows.append(("send lag", result.send_lag))
    for name, s in rows:
        lines.append(
            f"{name:<14}{_ms(s.p50):>10}{_ms(s.p90):>10}{_ms(s.p99):>10}{_ms(s.mean):>10}"
            f"{_ms(s.max):>10}{s.count:>8}"
        )
    lines.append("")
    if result.errors_by_code:
        errs = ", ".join(f"{k} {v}" for k, v in result.errors_by_code.items())
        lines.append(f"errors by status code: {errs}")
        first = next(r for r in result.records if not r.ok)
        lines.append(f"first error: {first.status}: {first.error}")
    else:
        lines.append("errors by status code: none")
    if len(result.requests_by_endpoint) > 1:
        eps = ", ".join(f"{k} {v}" for k, v in result.requests_by_endpoint.items())
        lines.append(f"requests by endpoint: {eps}")
    cpu = result.client_cpu_fraction
    note = "  (the generator may be the bottleneck)" if cpu > 0.8 else ""
    lines.append(f"generator CPU: {cpu * 100:.0f}% of one core{note}")
    return "\n".join(lines)


class _Progress:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._shown = False

    def show(self, elapsed: float, records: list[RequestRecord], in_flight: int) -> None:
        if not self.enabled:
            return
        ok = sum(1 for r in records if r.ok)
        tokens = sum(r.output_tokens for r in records if r.ok)
        line = (
            f"[{elapsed:7.1f}s] {ok} ok, {len(records) - ok} failed, {in_flight} in flight | "
            f"{ok / max(elapsed, 1e-9):.2f} req/s, {tokens / max(elapsed, 1e-9):.1f} tok/s"
        )
        self.stream.write("\r" + line.ljust(90))
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()


class _Runner:
    def __init__(self, config: LoadTestConfig, progress_stream: TextIO) -> None:
        self.config = config
        self.mix = config.adapter_mix()
        self.prompts = config.prompt_set()
        self.rng = random.Random(config.seed)
        self.records: list[RequestRecord] = []
        self.issued = 0
        self.in_flight = 0
        self.t0 = 0.0
        self.progress = _Progress(progress_stream, config.progress)

    def _more(self) -> bool:
        c = self.config
        if c.num_requests is not None and self.issued >= c.num_requests:
            return False
        return c.duration_s is None or time.perf_counter() - self.t0 < c.duration_s

    def _next_request(self) -> tuple[str, int]:
        self.issued += 1
        if self.config.distribution == "round_robin":  # each adapter in turn
            adapters = self.config.adapters
            return adapters[(self.issued - 1) % len(adapters)], (self.issued - 1) % len(
                self.prompts)
        return self.mix.sample(self.rng), self.rng.randrange(len(self.prompts))

    async def _one(
        self, client: AsyncSwitchboardClient, adapter_id: str, prompt_index: int,
        scheduled: float | None = None,
    ) -> None:
        c = self.config
        start = time.perf_counter()
        rec = RequestRecord(start=start - self.t0, adapter_id=adapter_id,
                            prompt_index=prompt_index)
        if scheduled is not None:
            rec.send_lag = max(start - scheduled, 0.0)
        params: dict[str, Any] = dict(
            adapter_id=adapter_id, max_new_tokens=c.max_new_tokens, ignore_eos=c.ignore_eos,
            temperature=c.temperature, timeout=c.timeout_s,
            **self.prompts[prompt_index].request_kwargs(),
        )
        self.in_flight += 1
        try:
            if c.stream:
                last = start
                async for chunk in client.generate_stream(token_ids_out=True, **params):
                    now = time.perf_counter()
                    n = len(chunk.token_ids) or (1 if chunk.text else 0)
                    if n and rec.ttft is None:
                        rec.ttft = now - start
                    elif n:
                        rec.itl.extend([(now - last) / n] * n)
                    if n:
                        last = now
                    if chunk.is_last:
                        rec.prompt_tokens = chunk.prompt_tokens
                        rec.output_tokens = chunk.completion_tokens
                        rec.endpoint = chunk.endpoint
            else:
                result = await client.generate(**params)
                rec.prompt_tokens = result.prompt_tokens
                rec.output_tokens = result.completion_tokens
                rec.endpoint = result.endpoint
            rec.e2e = time.perf_counter() - start
        except SwitchboardError as err:
            rec.status, rec.error = err.code.name, err.details
        except Exception as err:  # a generator bug must not kill the run; it is counted
            rec.status, rec.error = "CLIENT_ERROR", f"{type(err).__name__}: {err}"
        finally:
            self.in_flight -= 1
            self.records.append(rec)

    async def _closed_loop(self, client: AsyncSwitchboardClient) -> None:
        async def worker() -> None:
            while self._more():
                await self._one(client, *self._next_request())

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))

    async def _open_loop(self, client: AsyncSwitchboardClient) -> None:
        assert self.config.rate is not None
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.config.max_in_flight)
        scheduled = self.t0
        while True:
            scheduled += self.rng.expovariate(self.config.rate)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._more():
                break
            await slots.acquire()
            task = asyncio.create_task(self._one(client, *self._next_request(), scheduled))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
        if tasks:
            await asyncio.gather(*tasks)

    async def _report(self, done: asyncio.Event) -> None:
        while not done.is_set():
            self.progress.show(time.perf_counter() - self.t0, self.records, self.in_flight)
            try:
                await asyncio.wait_for(done.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> LoadTestResult:
        c = self.config
        target = c.target if isinstance(c.target, str) else list(c.target)
        async with AsyncSwitchboardClient(target, api_key=c.api_key,
                                          **c.client_options) as client:
            done = asyncio.Event()
            cpu0 = time.process_time()
            self.t0 = time.perf_counter()
            reporter = asyncio.create_task(self._report(done))
            try:
                if c.rate is not None:
                    await self._open_loop(client)
                else:
                    await self._closed_loop(client)
            finally:
                done.set()
                await reporter
            wall = time.perf_counter() - self.t0
            cpu = time.process_time() - cpu0
        self.progress.show(wall, self.records, 0)
        self.progress.finish()
        return build_result(c, self.records, wall, cpu)


def run_loadtest(config: LoadTestConfig, *, progress_stream: TextIO | None = None) -> (
        LoadTestResult):
    """Run a load test to completion (blocking; starts its own event loop)."""
    runner = _Runner(config, progress_stream or sys.stderr)
    return asyncio.run(runner.run())
