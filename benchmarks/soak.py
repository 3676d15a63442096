"""Soak: mixed traffic against one server for a long time; nothing unexpected may fail and
resident memory may not grow.

    python -m benchmarks.soak [--duration 600] [--adapters 12] [--concurrency 4]
    make soak SOAK_ARGS="--duration 180"

Traffic, all at once for --duration seconds:
- the load generator (clients.loadtest, streaming, zipf over the stable adapters and the
  base model) with an API key; every one of its requests must succeed;
- first, each adapter used once (they load just in time), not counted;
- a chaos thread doing, at random: hot swaps of stable adapters (LoadAdapter on an existing
  id while it serves), load/use/unload of churn adapters, streams cancelled after a few
  chunks, requests with short deadlines, and bad requests (bad parameters, no key, wrong
  key, an adapter outside the key's patterns, malformed bytes). Each action has the status
  codes it may end with; any other is an unexpected failure.
Reports requests sent, succeeded, failed by code, unexpected failures (must be 0) and the
server's resident memory (VmRSS) at the end of warm-up and at the end (growth <= 5%).
Writes benchmarks/results/soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
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


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Chaos:
    """Random disruptive actions; records each action's status code against the codes it
    is allowed to end with."""

    def __init__(self, target: str, stable: list[str], churn: list[str], seed: int) -> None:
        self.channel = grpc.insecure_channel(target)
        self.gen = pb_grpc.TextGenerationStub(self.channel)
        self.admin = pb_grpc.AdapterAdminStub(self.channel)
        self.raw = self.channel.unary_unary("/switchboard.v1.TextGeneration/Generate",
                                            request_serializer=None,
                                            response_deserializer=None)
        self.stable, self.churn = stable, churn
        self.rng = random.Random(seed)
        self.codes: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.sent = 0

    def _md(self, key: str | None = KEY):
        return (("authorization", f"Bearer {key}"),) if key else ()

    def _record(self, action: str, allowed: set, fn) -> None:
        self.sent += 1
        self.actions[action] += 1
        try:
            fn()
            code, details = C.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        self.codes[code.name] += 1
        if code not in allowed:
            self.unexpected.append(f"{action}: {code.name}: {details}")

    def _req(self, adapter: str = "", n: int = 8, **kw) -> pb.GenerateRequest:
        return pb.GenerateRequest(adapter_id=adapter, prompt=kw.pop("prompt", "Tell me a story"),
                                  stopping=pb.StoppingCriteria(max_new_tokens=n,
                                                               ignore_eos=True), **kw)

    def hot_swap(self) -> None:
        a = self.rng.choice(self.stable)
        self._record("hot_swap", {C.OK}, lambda: self.admin.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id=a, path=a), metadata=self._md(), timeout=60))

    def churn_cycle(self) -> None:
        a = self.rng.choice(self.churn)
        self._record("churn_load", {C.OK}, lambda: self.admin.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id=a, path=f"churn/{a}"), metadata=self._md(),
            timeout=60))
        self._record("churn_use", {C.OK}, lambda: self.gen.Generate(
            self._req(a), metadata=self._md(), timeout=60))
        self._record("churn_unload", {C.OK}, lambda: self.admin.UnloadAdapter(
            pb.UnloadAdapterRequest(adapter_id=a), metadata=self._md(), timeout=60))
        self._record("churn_use_unloaded", {C.NOT_FOUND}, lambda: self.gen.Generate(
            self._req(a), metadata=self._md(), timeout=60))

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
            timeout=timeout))

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
                   (self.deadline, 3), (self.bad, 4)]
        fns, weights = zip(*actions, strict=True)
        while time.monotonic() < until:
            self.rng.choices(fns, weights)[0]()
            time.sleep(self.rng.uniform(0.0, 0.2))


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
                "--kv-cache-memory", "256MiB", "--max-new-tokens", "128"]
        with Server(args) as server:
            result = soak(server, stable, churn, a, warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [("duration (s)", result["duration_s"]), ("requests sent", result["sent"]),
            ("succeeded", result["succeeded"]),
            *[(f"failed {k}", v) for k, v in result["failed_by_code"].items()],
            ("unexpected failures", result["unexpected_failures"]),
            ("RSS at warm-up (MiB)", result["rss_warmup_bytes"] / 2**20),
            ("RSS at end (MiB)", result["rss_end_bytes"] / 2**20),
            ("RSS growth (%)", result["rss_growth"] * 100)]
    print_table("soak", rows)
    for line in result["unexpected_examples"]:
        print(f"unexpected: {line}")
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
        chaos.gen.Generate(chaos._req(a, 2), metadata=chaos._md(), timeout=120)
    for a in chaos.churn:
        chaos.admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id=a, path=f"churn/{a}"),
                                metadata=chaos._md(), timeout=120)
        chaos.gen.Generate(chaos._req(a, 2), metadata=chaos._md(), timeout=120)
        chaos.admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=a),
                                  metadata=chaos._md(), timeout=120)


def soak(server: Server, stable: list[str], churn: list[str], a, warmup: float) -> dict:
    pid = server.proc.pid
    chaos = Chaos(server.target, stable, churn, a.seed)
    touch_every_adapter(chaos)
    t0 = time.monotonic()
    until = t0 + a.duration
    chaos_thread = threading.Thread(target=chaos.run, args=(until,), daemon=True)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(5.0):
            samples.append((time.monotonic() - t0, rss_bytes(pid)))

    rss_warm: list[int] = []
    threading.Timer(warmup, lambda: rss_warm.append(rss_bytes(pid))).start()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    chaos_thread.start()
    load = run_loadtest(LoadTestConfig(
        target=server.target, concurrency=a.concurrency, duration_s=a.duration,
        adapters=("", *stable), distribution="zipf", max_new_tokens=a.max_new_tokens,
        ignore_eos=True, stream=True, seed=a.seed, timeout_s=120, progress=False,
        api_key=KEY))
    chaos_thread.join()
    stop.set()
    rss_end = rss_bytes(pid)
    warm = rss_warm[0] if rss_warm else samples[0][1]
    load_failed = dict(load.errors_by_code)
    failed = Counter(load_failed)
    for code, n in chaos.codes.items():
        if code != "OK":
            failed[code] += n
    unexpected = [f"load: {r.status}: {r.error}" for r in load.records if not r.ok]
    unexpected += chaos.unexpected
    sent = len(load.records) + chaos.sent
    growth = (rss_end - warm) / warm
    return {
        "duration_s": round(time.monotonic() - t0, 1),
        "settings": {k: v for k, v in vars(a).items() if k != "no_write"},
        "sent": sent,
        "succeeded": load.requests_ok + chaos.codes.get("OK", 0),
        "failed_by_code": dict(failed.most_common()),
        "expected_failures": sum(failed.values()) - len(unexpected),
        "unexpected_failures": len(unexpected),
        "unexpected_examples": unexpected[:10],
        "load": {"requests_ok": load.requests_ok, "requests_failed": load.requests_failed,
                 "output_tokens_per_s": load.output_tokens_per_s,
                 "e2e_p50_s": load.e2e.p50, "e2e_p99_s": load.e2e.p99,
                 "requests_by_adapter": load.requests_by_adapter},
        "chaos_actions": dict(chaos.actions),
        "rss_warmup_bytes": warm,
        "rss_end_bytes": rss_end,
        "rss_growth": growth,
        "rss_samples": samples,
        "passed": not unexpected and growth <= MAX_RSS_GROWTH,
    }


if __name__ == "__main__":
    main()
