"""Soak: mixed traffic against one server for a long time; nothing unexpected may fail,
every answer must be right, and resident memory may not grow.

    python -m benchmarks.soak [--duration 600] [--adapters 12] [--concurrency 4]
    make soak SOAK_ARGS="--duration 180"

Traffic, all at once for --duration seconds:
- the load generator (clients.loadtest, streaming, greedy, EOS ignored, zipf over the
  stable adapters and the base model) with an API key; every one of its requests must
  succeed with exactly --max-new-tokens tokens;
- first, each adapter used once (they load just in time), not counted; then the greedy
  answer (token ids) of a fixed prompt is recorded for the base model and every stable
  adapter, one request at a time, before any chaos;
- a chaos thread doing, at random: hot swaps of stable adapters (LoadAdapter on an existing
  id while it serves, from the same files), load/use/unload of churn adapters, streams
  cancelled after a few chunks, requests with short deadlines, bad requests (bad
  parameters, no key, wrong key, an adapter outside the key's patterns, malformed bytes),
  and probes: the fixed prompt, greedy, on the base model or a stable adapter, unary or
  streamed, whose token ids must equal the reference recorded for the files the answering
  adapter version was loaded from. Each action has the status codes it may end with; any
  other is an unexpected failure. Every OK generation with EOS ignored must have exactly
  the tokens it asked for. An exception that ends the chaos thread fails the soak.
- the server's own view: its Prometheus counter `switchboard_requests_total` by status code
  (read every few seconds, just before each unload, whose label it frees, and at the end),
  so that a server-side error hidden behind a client's own cancel or deadline still shows;
  any code other than those the traffic asks for fails the soak, and so does any ERROR or
  CRITICAL log line or traceback of the server other than gRPC's own "Exception
  deserializing message!" for the malformed bytes.
Reports requests sent, succeeded, failed by code, unexpected failures (must be 0), the
length and content checks made and failed, the server's counts by code, and the server's
resident memory (VmRSS) at the end of warm-up and at the end (growth <= 5%).
Writes benchmarks/results/soak.json (with date, command line, commit and CPU); exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from benchmarks.common import Server, print_table, write_results
from benchmarks.serving import make_adapters
from clients.loadtest import LoadTestConfig, run_loadtest
from server.security.keys import hash_key
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

C = grpc.StatusCode
KEY, OTHER_KEY = "soak-key", "soak-other-key"
MAX_RSS_GROWTH = 0.05
# A prompt whose greedy answer has a clear winner at every step (the top two logits of the
# default model at least 1.9 apart over these 16 tokens in HF fp32): a content check may not
# rest on a near-tie that batching flips.
PROBE_PROMPT, PROBE_TOKENS = "1, 2, 3, 4, 5, 6, 7, 8,", 16
# Status codes the server may count for this traffic (client cancels and deadlines show up
# as CANCELLED or DEADLINE_EXCEEDED there); anything else is a server-side error.
SERVER_CODES = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "NOT_FOUND", "INVALID_ARGUMENT",
                "UNAUTHENTICATED", "PERMISSION_DENIED"}
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) (\S+): (.*)")
TRACEBACK_LINES = (" ", "\t", "Traceback", "During handling", "The above exception")
EXPECTED_ERROR_LOGS = {("grpc._common", "Exception deserializing message!")}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class ServerCounts:
    """The server's count of finished requests by status code, from the counter
    `switchboard_requests_total{adapter, code}` on its /metrics endpoint. Unloading an
    adapter frees its label and removes its series, so the chaos thread reads the counts
    just before each unload and `forget`s the series after it; a series found lower than
    at the previous reading counts as restarted from zero."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.lock = threading.Lock()
        self.last: dict[tuple[str, str], float] = {}
        self.by_code: Counter[str] = Counter()
        self.readings = 0

    def read(self) -> dict[str, dict[tuple[str, ...], float]]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.url, timeout=30).read().decode()
        out: dict[str, dict[tuple[str, ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("switchboard_requests_total", "switchboard_requests_running",
                                   "switchboard_requests_waiting"):
                    key = tuple(sample.labels.get(k, "") for k in ("adapter", "code"))
                    out.setdefault(sample.name, {})[key] = sample.value
        return out

    def update(self) -> dict[str, dict[tuple[str, ...], float]]:
        with self.lock:
            now = self.read()
            totals = now.get("switchboard_requests_total", {})
            for key, value in totals.items():
                before = self.last.get(key, 0.0)
                self.by_code[key[1]] += int(round(value - before if value >= before else value))
            self.last = dict(totals)
            self.readings += 1
        return now

    def forget(self, adapter_id: str) -> None:
        with self.lock:
            self.last = {k: v for k, v in self.last.items() if k[0] != adapter_id}

    def drain(self, timeout: float = 120.0) -> None:
        """Final reading, once no request is running or waiting on the server."""
        end = time.monotonic() + timeout
        while True:
            now = self.update()
            busy = sum(now.get("switchboard_requests_running", {}).values()) + sum(
                now.get("switchboard_requests_waiting", {}).values())
            if not busy or time.monotonic() > end:
                return
            time.sleep(1.0)


def server_log_errors(lines: list[str]) -> tuple[list[str], int, Counter[str]]:
    """The server's log records at ERROR or above (with their traceback lines), and stray
    tracebacks, less the expected ones; the count of expected ones; records by level."""
    records: list[tuple[str, str, str, list[str]]] = []
    for line in lines:
        m = LOG_RECORD.match(line)
        if m:
            records.append((m.group(1), m.group(2), m.group(3).strip(), [line]))
        elif records and (line.startswith(TRACEBACK_LINES) or not line.strip()
                          or records[-1][3][-1].startswith((" ", "\t"))):
            records[-1][3].append(line)  # a traceback's lines belong to their record
        else:
            records.append(("", "", line.strip(), [line]))
    bad, expected, levels = [], 0, Counter()
    for level, name, message, body in records:
        levels[level or "other"] += 1
        traced = any(b.startswith("Traceback") for b in body)
        if level in ("ERROR", "CRITICAL") or traced:
            if (name, message) in EXPECTED_ERROR_LOGS:
                expected += 1
            else:
                bad.append("".join(body)[-1500:])
    return bad, expected, levels


class Chaos:
    """Random disruptive actions; records each action's status code against the codes it
    is allowed to end with, and checks every OK answer's length (and a probe's content)."""

    def __init__(self, target: str, stable: list[str], churn: list[str], seed: int,
                 counts: ServerCounts | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.gen = pb_grpc.TextGenerationStub(self.channel)
        self.admin = pb_grpc.AdapterAdminStub(self.channel)
        self.raw = self.channel.unary_unary("/switchboard.v1.TextGeneration/Generate",
                                            request_serializer=None,
                                            response_deserializer=None)
        self.stable, self.churn = stable, churn
        self.counts = counts
        self.rng = random.Random(seed)
        self.codes: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.sent = 0
        self.length_checks = 0
        self.length_failures: list[str] = []
        # Content: the greedy answer of PROBE_PROMPT by the files an adapter version was
        # loaded from ("" = the base model); versions map to those files.
        self.reference: dict[str, list[int]] = {}
        self.reference_text: dict[str, str] = {}
        self.loaded_from: dict[tuple[str, str], str] = {}
        self.content_checks = 0
        self.content_checks_swapped = 0
        self.content_failures: list[str] = []
        self.first_version: dict[str, str] = {}
        self.error: str | None = None

    def _md(self, key: str | None = KEY):
        return (("authorization", f"Bearer {key}"),) if key else ()

    def _record(self, action: str, allowed: set, fn, tokens: int | None = None) -> None:
        """Runs `fn`; with `tokens`, an OK answer must have exactly that many."""
        self.sent += 1
        self.actions[action] += 1
        try:
            resp = fn()
            code, details = C.OK, ""
        except grpc.RpcError as e:
            resp, code, details = None, e.code(), e.details()
        self.codes[code.name] += 1
        if code not in allowed:
            self.unexpected.append(f"{action}: {code.name}: {details}")
        if code == C.OK and tokens is not None:
            self._check_length(action, resp.completion_tokens, tokens)

    def _check_length(self, what: str, got: int, want: int) -> None:
        self.length_checks += 1
        if got != want:
            self.length_failures.append(f"{what}: {got} tokens, asked for {want}")

    def _req(self, adapter: str = "", n: int = 8, **kw) -> pb.GenerateRequest:
        return pb.GenerateRequest(adapter_id=adapter, prompt=kw.pop("prompt", "Tell me a story"),
                                  stopping=pb.StoppingCriteria(max_new_tokens=n,
                                                               ignore_eos=True), **kw)

    def _probe_req(self, adapter: str) -> pb.GenerateRequest:
        return self._req(adapter, PROBE_TOKENS, prompt=PROBE_PROMPT,
                         sampling=pb.SamplingParameters(temperature=0.0),
                         response=pb.ResponseOptions(token_ids=True))

    def _unload(self, adapter: str) -> pb.UnloadAdapterResponse:
        if self.counts is not None:
            self.counts.update()  # the unload removes this adapter's series
        try:
            return self.admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter),
                                            metadata=self._md(), timeout=60)
        finally:
            if self.counts is not None:
                self.counts.forget(adapter)

    def _load(self, adapter: str, path: str) -> pb.LoadAdapterResponse:
        resp = self.admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter, path=path),
                                      metadata=self._md(), timeout=60)
        self.loaded_from[(adapter, resp.adapter.version)] = path
        return resp

    def record_references(self) -> None:
        """The probe's greedy answer for the base model and each stable adapter, one
        request at a time, before any chaos."""
        for a in ["", *self.stable]:
            resp = self.gen.Generate(self._probe_req(a), metadata=self._md(), timeout=120)
            self._check_length("reference", resp.completion_tokens, PROBE_TOKENS)
            self.loaded_from[(a, resp.adapter_version)] = a  # scanned from the directory a
            self.first_version[a] = resp.adapter_version
            self.reference[a] = list(resp.token_ids)
            self.reference_text[a] = resp.text

    def probe(self) -> None:
        a = self.rng.choice(["", *self.stable])
        stream = self.rng.random() < 0.5

        def run():
            if not stream:
                return self.gen.Generate(self._probe_req(a), metadata=self._md(), timeout=120)
            ids, text, last = [], [], None
            for chunk in self.gen.GenerateStream(self._probe_req(a), metadata=self._md(),
                                                 timeout=120):
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
                last = chunk
            return ids, "".join(text), last

        action = "probe_stream" if stream else "probe"
        self.sent += 1
        self.actions[action] += 1
        try:
            out = run()
        except grpc.RpcError as e:
            self.codes[e.code().name] += 1
            self.unexpected.append(f"{action}: {e.code().name}: {e.details()}")
            return
        self.codes["OK"] += 1
        if stream:
            ids, text, last = out
        else:
            ids, text, last = list(out.token_ids), out.text, out
        self._check_length(action, last.completion_tokens, PROBE_TOKENS)
        version = last.adapter_version
        source = a if a == "" else self.loaded_from.get((a, version))
        self.content_checks += 1
        if a and version != self.first_version[a]:
            self.content_checks_swapped += 1
        if source is None:
            self.content_failures.append(f"{action} {a!r}: answered by version {version!r}, "
                                         "which no load of this soak made")
        elif ids != self.reference[source]:
            self.content_failures.append(
                f"{action} {a!r} version {version!r}: {text!r} ({ids}), expected "
                f"{self.reference_text[source]!r} ({self.reference[source]})")

    def hot_swap(self) -> None:
        a = self.rng.choice(self.stable)
        self._record("hot_swap", {C.OK}, lambda: self._load(a, a))

    def churn_cycle(self) -> None:
        a = self.rng.choice(self.churn)
        self._record("churn_load", {C.OK}, lambda: self._load(a, f"churn/{a}"))
        self._record("churn_use", {C.OK}, lambda: self.gen.Generate(
            self._req(a), metadata=self._md(), timeout=60), tokens=8)
        self._record("churn_unload", {C.OK}, lambda: self._unload(a))
        self._record("churn_use_unloaded", {C.NOT_FOUND}, lambda: self.gen.Generate(
            self._req(a), metadata=self._md(), timeout=60), tokens=8)

    def cancel(self) -> None:
        def run() -> None:
            call = self.gen.GenerateStream(self._req(self.rng.choice(["", *self.stable]), 64),
                                           metadata=self._md(), timeout=60)
            for _ in range(self.rng.randint(1, 3)):
                next(call)
            call.cancel()
            list(call)

        self._record("cancel", {C.CANCELLED}, run)

    def deadline(self) -> None:
        timeout = self.rng.uniform(0.02, 0.4)
        self._record("deadline", {C.DEADLINE_EXCEEDED, C.OK}, lambda: self.gen.Generate(
            self._req(self.rng.choice(["", *self.stable]), 64), metadata=self._md(),
            timeout=timeout), tokens=64)

    def bad(self) -> None:
        kind = self.rng.randrange(6)
        if kind == 0:
            msg = self._req(sampling=pb.SamplingParameters(temperature=-1.0))
            self._record("bad_params", {C.INVALID_ARGUMENT}, lambda: self.gen.Generate(
                msg, metadata=self._md(), timeout=30))
        elif kind == 1:
            self._record("no_key", {C.UNAUTHENTICATED}, lambda: self.gen.Generate(
                self._req(), timeout=30))
        elif kind == 2:
            self._record("wrong_key", {C.UNAUTHENTICATED}, lambda: self.gen.Generate(
                self._req(), metadata=self._md("nope"), timeout=30))
        elif kind == 3:
            self._record("adapter_not_allowed", {C.PERMISSION_DENIED},
                         lambda: self.gen.Generate(self._req(self.stable[0]),
                                                   metadata=self._md(OTHER_KEY), timeout=30))
        elif kind == 4:
            self._record("unknown_adapter", {C.NOT_FOUND}, lambda: self.gen.Generate(
                self._req("soak-missing"), metadata=self._md(), timeout=30))
        else:
            junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 200)))
            self._record("malformed_bytes", {C.INVALID_ARGUMENT, C.OK, C.NOT_FOUND},
                         lambda: self.raw(junk, metadata=self._md(), timeout=30))

    def run(self, until: float) -> None:
        actions = [(self.hot_swap, 2), (self.churn_cycle, 1), (self.cancel, 3),
                   (self.deadline, 3), (self.bad, 4), (self.probe, 3)]
        fns, weights = zip(*actions, strict=True)
        try:
            while time.monotonic() < until:
                self.rng.choices(fns, weights)[0]()
                time.sleep(self.rng.uniform(0.0, 0.2))
        except BaseException:  # the thread's death fails the soak
            self.error = traceback.format_exc()
            raise


def write_keys(path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"keys": [
        {"name": "soak", "hash": hash_key(KEY), "adapters": ["soak-*"], "admin": True},
        {"name": "other", "hash": hash_key(OTHER_KEY), "adapters": ["other-*"]},
    ]}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the warm-up RSS reading (default 10%% of duration, "
                   "at most 60)")
    p.add_argument("--adapters", type=int, default=12, help="stable adapters (default 12)")
    p.add_argument("--churn-adapters", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-active-adapters", type=int, default=4,
                   help="device slots; fewer than adapters so that slots are evicted")
    p.add_argument("--base-model", default=None, help="default: the default model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not write soak.json")
    a = p.parse_args(argv)
    warmup = a.warmup if a.warmup is not None else min(60.0, a.duration * 0.1)

    from server.model_store import provision_default_model

    model_dir = Path(a.base_model) if a.base_model else provision_default_model()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        root = work / "adapters"
        names = make_adapters(model_dir, work / "made", a.adapters + a.churn_adapters, 8)
        stable = [f"soak-{i}" for i in range(a.adapters)]
        churn = [f"soak-churn-{i}" for i in range(a.churn_adapters)]
        (root / "churn").mkdir(parents=True)
        for src, dst in zip(names, stable + churn, strict=True):
            shutil.copytree(work / "made" / src, root / ("churn" if dst in churn else "") / dst)
        write_keys(work / "keys.yaml")
        args = ["--base-model", model_dir, "--adapter-dir", root, "--enable-admin",
                "--api-keys", work / "keys.yaml", "--max-active-adapters",
                a.max_active_adapters, "--max-lora-rank", "8", "--max-seq-len", "512",
                "--kv-cache-memory", "256MiB", "--max-new-tokens", "128",
                "--metrics-port", "0"]
        with Server(args) as server:
            result = soak(server, stable, churn, a, warmup)
        time.sleep(1.0)  # the server's last output lines
        bad_logs, expected_logs, levels = server_log_errors(list(server.lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["server_log"] = {"records_by_level": dict(levels),
                            "expected_error_records": expected_logs,
                            "unexpected_error_records": len(bad_logs),
                            "unexpected_examples": bad_logs[:5]}
    result["passed"] = result["passed"] and not bad_logs
    chk, srv = result["checks"], result["server_side"]
    rows = [("duration (s)", result["duration_s"]), ("requests sent", result["sent"]),
            ("succeeded", result["succeeded"]),
            *[(f"failed {k}", v) for k, v in result["failed_by_code"].items()],
            ("unexpected failures", result["unexpected_failures"]),
            ("length checks", chk["length_checked"]),
            ("length check failures", chk["length_failures"]),
            ("content checks (probes)", chk["content_checked"]),
            ("  of them on swapped versions", chk["content_checked_swapped_versions"]),
            ("content check failures", chk["content_failures"]),
            *[(f"server counted {k}", v) for k, v in srv["requests_by_code"].items()],
            ("server-side unexpected codes", srv["unexpected"]),
            ("server ERROR logs, expected", expected_logs),
            ("server ERROR logs, unexpected", len(bad_logs)),
            ("chaos thread died", result["chaos_error"] is not None),
            ("RSS at warm-up (MiB)", result["rss_warmup_bytes"] / 2**20),
            ("RSS at end (MiB)", result["rss_end_bytes"] / 2**20),
            ("RSS growth (%)", result["rss_growth"] * 100)]
    print_table("soak", rows)
    for line in result["unexpected_examples"] + chk["failure_examples"] + bad_logs[:5]:
        print(f"unexpected: {line}")
    if result["chaos_error"]:
        print(f"chaos thread died:\n{result['chaos_error']}")
    print("PASS" if result["passed"] else "FAIL")
    if not a.no_write:
        print(f"wrote {write_results('soak', result)}")
    if not result["passed"]:
        raise SystemExit(1)
    return result


def touch_every_adapter(chaos: Chaos) -> None:
    """Adapters load just in time; use each once so that the warm-up RSS reading already
    holds every adapter in host memory (otherwise the zipf tail reads as growth)."""
    for a in chaos.stable:
        resp = chaos.gen.Generate(chaos._req(a, 2), metadata=chaos._md(), timeout=120)
        chaos._check_length("touch", resp.completion_tokens, 2)
    for a in chaos.churn:
        chaos._load(a, f"churn/{a}")
        resp = chaos.gen.Generate(chaos._req(a, 2), metadata=chaos._md(), timeout=120)
        chaos._check_length("touch", resp.completion_tokens, 2)
        chaos._unload(a)


def soak(server: Server, stable: list[str], churn: list[str], a, warmup: float) -> dict:
    pid = server.proc.pid
    if not server.metrics_port:
        raise RuntimeError("the server gave no metrics port; the soak reads its counts there")
    counts = ServerCounts(server.metrics_port)
    chaos = Chaos(server.target, stable, churn, a.seed, counts)
    touch_every_adapter(chaos)
    chaos.record_references()
    t0 = time.monotonic()
    until = t0 + a.duration
    chaos_thread = threading.Thread(target=chaos.run, args=(until,), daemon=True)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    helper_errors: list[str] = []

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException:
                helper_errors.append(traceback.format_exc())
        return run

    def sample() -> None:  # RSS, and the server's counts
        while not stop.wait(5.0):
            samples.append((time.monotonic() - t0, rss_bytes(pid)))
            counts.update()

    rss_warm: list[int] = []
    threading.Timer(warmup, guarded(lambda: rss_warm.append(rss_bytes(pid)))).start()
    sampler = threading.Thread(target=guarded(sample), daemon=True)
    sampler.start()
    chaos_thread.start()
    load = run_loadtest(LoadTestConfig(
        target=server.target, concurrency=a.concurrency, duration_s=a.duration,
        adapters=("", *stable), distribution="zipf", max_new_tokens=a.max_new_tokens,
        ignore_eos=True, stream=True, seed=a.seed, timeout_s=120, progress=False,
        api_key=KEY))
    chaos_thread.join()
    stop.set()
    sampler.join()
    counts.drain()
    rss_end = rss_bytes(pid)
    warm = rss_warm[0] if rss_warm else samples[0][1]
    load_failed = dict(load.errors_by_code)
    failed = Counter(load_failed)
    for code, n in chaos.codes.items():
        if code != "OK":
            failed[code] += n
    unexpected = [f"load: {r.status}: {r.error}" for r in load.records if not r.ok]
    unexpected += chaos.unexpected
    load_ok = [r for r in load.records if r.ok]
    for r in load_ok:
        chaos._check_length(f"load {r.adapter_id!r}", r.output_tokens, a.max_new_tokens)
    server_codes = dict(counts.by_code.most_common())
    server_unexpected = {k: v for k, v in server_codes.items() if k not in SERVER_CODES and v}
    sent = len(load.records) + chaos.sent
    growth = (rss_end - warm) / warm
    failures = chaos.length_failures + chaos.content_failures
    return {
        "duration_s": round(time.monotonic() - t0, 1),
        "settings": {k: v for k, v in vars(a).items() if k != "no_write"},
        "sent": sent,
        "succeeded": load.requests_ok + chaos.codes.get("OK", 0),
        "failed_by_code": dict(failed.most_common()),
        "expected_failures": sum(failed.values()) - len(unexpected),
        "unexpected_failures": len(unexpected),
        "unexpected_examples": unexpected[:10],
        "checks": {
            "length_checked": chaos.length_checks,
            "length_checked_load": len(load_ok),
            "length_failures": len(chaos.length_failures),
            "content_checked": chaos.content_checks,
            "content_checked_swapped_versions": chaos.content_checks_swapped,
            "content_failures": len(chaos.content_failures),
            "failure_examples": failures[:10],
            "probe": {"prompt": PROBE_PROMPT, "max_new_tokens": PROBE_TOKENS,
                      "references": len(chaos.reference),
                      "distinct_reference_answers": len({tuple(v) for v in
                                                         chaos.reference.values()}),
                      "reference_texts": chaos.reference_text},
        },
        "server_side": {
            "source": "switchboard_requests_total by code, from the server's /metrics",
            "note": "the server counts a request the client cancelled (or whose deadline "
                    "passed) as OK when the engine ends it (finish reason cancelled), and "
                    "not at all when gRPC closes the stream first; requests refused by the "
                    "API-key check and undecodable bytes are not counted",
            "readings": counts.readings,
            "requests_by_code": server_codes,
            "allowed_codes": sorted(SERVER_CODES),
            "unexpected": sum(server_unexpected.values()),
            "unexpected_by_code": server_unexpected,
        },
        "chaos_error": chaos.error,
        "helper_thread_errors": helper_errors,
        "load": {"requests_ok": load.requests_ok, "requests_failed": load.requests_failed,
                 "output_tokens_per_s": load.output_tokens_per_s,
                 "e2e_p50_s": load.e2e.p50, "e2e_p99_s": load.e2e.p99,
                 "requests_by_adapter": load.requests_by_adapter},
        "chaos_actions": dict(chaos.actions),
        "rss_warmup_bytes": warm,
        "rss_end_bytes": rss_end,
        "rss_growth": growth,
        "rss_samples": samples,
        "passed": (not unexpected and not failures and chaos.error is None
                   and not helper_errors and not server_unexpected
                   and growth <= MAX_RSS_GROWTH),
    }


if __name__ == "__main__":
    main()
