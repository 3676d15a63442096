"""Adapter lifecycle benchmarks on the default model (fp32 unless stated).

(a) Many adapters against resident ones. 256 registered LoRA adapters (rank 16, all seven
    projections, 19.6 MB each in fp32), 16 device slots and a host-memory budget
    (--host-memory, default 1 GiB) far under their total (5 GB): the "many" run sends one
    request to each of the 256 adapters, in an order shuffled by the run's seed
    (round-robin over a seeded permutation), from 32 clients; the "resident" run sends the
    same number of requests round-robin over a seeded permutation of 16 adapters that stay
    in their slots. The two alternate in order from run to run. Per run: throughput of
    each, their ratio, and from the server's Prometheus counters the adapter reads from
    disk (host-tier loads), host evictions, slot writes and slot evictions.
(b) Cold load of one rank-16 all-projection adapter from local disk (its files dropped
    from the page cache first; the server reads them with O_DIRECT) to usable (LoadAdapter
    round trip, then the first token of a request on it): p50 and max of --cold-loads
    samples, on the fresh server (host budget with room) and after the many runs (budget
    full), with how many of those loads evicted another adapter from host memory.
(c) nf4 base: resident weight memory against fp32 (like with like: the fp32 server's
    transposed output-embedding copy, which only the fp32 CPU engine keeps, is left out of
    the fp32 side), throughput, and greedy-token agreement with the fp32 server.

    python -m benchmarks.adapters [--runs 3] [--host-memory 1GiB] [--seed 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from benchmarks.common import Server, median, print_table, write_results
from clients.loadtest import LoadTestConfig, run_loadtest
from server.config import parse_size
from server.model_store import provision_default_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAFFIC = ("round-robin over a permutation of the adapter ids shuffled by the run's seed "
           "(random.Random(seed).shuffle); request i names permutation[i % len], prompt i "
           "is built-in chat prompt i % 26 (clients.workload); closed loop, each client "
           "sends its next request when its previous one ends")
DISK_READS = ("switchboard_adapter_loads_total{tier=\"host\"} delta: every load into the "
              "host tier reads the adapter's files from disk (O_DIRECT, past the page "
              "cache); no metric counts disk reads by that name")
EVICTING_LOADS = ("switchboard_adapter_evictions_total{tier=\"host\"} delta. Every adapter "
                  "has the same size and at most slots + 1 of them are exempt from eviction "
                  "(on the device, or just loaded), far under the budget, so one load evicts "
                  "at most one adapter: host evictions = loads that evicted")


def write_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    """PEFT-format LoRA adapters with random non-zero weights, written directly."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(model_dir)}
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        name = f"adapter-{i:03d}"
        tensors = {}
        for layer in range(layers):
            for module, (fan_in, fan_out) in shapes.items():
                part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
        path = root / name
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config))
        names.append(name)
    return names


def load(target, adapters, requests, new_tokens, clients=32, distribution="round_robin",
         seed=0):
    """A closed-loop load run; round_robin goes through `adapters` in the order given."""
    cfg = LoadTestConfig(target=target, concurrency=clients, duration_s=None,
                         num_requests=requests, adapters=tuple(adapters),
                         distribution=distribution, max_new_tokens=new_tokens,
                         ignore_eos=True, progress=False, seed=seed, timeout_s=1200.0)
    result = run_loadtest(cfg)
    if result.requests_failed:
        raise RuntimeError(f"{result.requests_failed} requests failed: {result.errors_by_code}")
    return result


def shuffled(names: list[str], seed: int) -> list[str]:
    order = list(names)
    random.Random(seed).shuffle(order)
    return order


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's adapter counters: host/device loads and evictions."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    out = {f"{tier}_{kind}": 0.0 for tier in ("host", "device") for kind in ("loads", "evictions")}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            kind = {"switchboard_adapter_loads_total": "loads",
                    "switchboard_adapter_evictions_total": "evictions"}.get(s.name)
            if kind and s.labels.get("tier") in ("host", "device"):
                out[f"{s.labels['tier']}_{kind}"] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    d = {k: int(after[k] - before[k]) for k in after}
    return {"disk_reads": d["host_loads"], "host_evictions": d["host_evictions"],
            "slot_writes": d["device_loads"], "slot_evictions": d["device_evictions"]}


def evict_from_page_cache(directory: Path) -> None:
    """Drop a directory's files from the OS page cache, so the next read comes from the
    disk (clean pages only, hence the fsync; no root needed)."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_loads(server: Server, root: Path, names: list[str]) -> dict:
    """Per adapter (a new id, its files out of the page cache): LoadAdapter round trip
    (read from disk, checked, in host memory, requests may use it), the part of it spent
    in the server's registry (its `load-seconds` trailer), load plus the first token of a
    request (which also writes its device slot), and whether the load evicted an adapter
    from host memory (the counters read before the load and after the first token)."""
    channel = grpc.insecure_channel(server.target)
    admin, stub = pb_grpc.AdapterAdminStub(channel), pb_grpc.TextGenerationStub(channel)
    loads, in_server, first_tokens, evicting = [], [], [], 0
    for name in names:
        evict_from_page_cache(root / name)
        before = scrape(server.metrics_port)
        t0 = time.perf_counter()
        _, call = admin.LoadAdapter.with_call(
            pb.LoadAdapterRequest(adapter_id=f"cold-{name}", path=name))
        loads.append(time.perf_counter() - t0)
        in_server.append(float(dict(call.trailing_metadata())["load-seconds"]))
        next(iter(stub.GenerateStream(pb.GenerateRequest(
            adapter_id=f"cold-{name}", prompt="Hi",
            stopping=pb.StoppingCriteria(max_new_tokens=1, ignore_eos=True)), timeout=60)))
        first_tokens.append(time.perf_counter() - t0)
        evicting += delta(scrape(server.metrics_port), before)["host_evictions"] > 0
    return {"samples": len(loads), "p50_ms": _ms(median(loads)), "max_ms": _ms(max(loads)),
            "in_registry_p50_ms": _ms(median(in_server)),
            "to_first_token_p50_ms": _ms(median(first_tokens)),
            "loads_that_evicted": evicting}


def greedy_tokens(target: str, prompts: list[str], new_tokens: int) -> list[list[int]]:
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(target))
    return [list(stub.Generate(pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=p)]),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True)), timeout=600).token_ids) for p in prompts]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where greedy tokens agree, up to each pair's first mismatch
    counted as agreement of the prefix (later tokens depend on earlier ones)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(x)
        for s, t in zip(x, y, strict=True):
            if s != t:
                break
            same += 1
    return same / total


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--adapters", type=int, default=256)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--host-memory", default="1GiB",
                   help="the server's --max-host-adapter-memory (default %(default)s)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per load run (default: one per adapter)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--cold-loads", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="run i's traffic uses seed + i")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="auto", help="the servers' --dtype (the nf4 one's too)")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.adapters, a.new_tokens, a.cold_loads = 1, 48, 16, 5
        a.host_memory = "512MiB"
    a.requests = a.requests or a.adapters
    budget = parse_size(a.host_memory)
    load_average = {"start": os.getloadavg()}  # other work on the machine shows here
    model_dir = provision_default_model()
    prompts = ["What is the capital of France?", "Write a haiku about autumn.",
               "Explain photosynthesis in one sentence.", "List three prime numbers."]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        names = write_adapters(model_dir, root, a.adapters, 16)
        os.sync()  # on disk before any is timed, not still being flushed from the cache
        print(f"{time.strftime('%H:%M:%S')} {a.adapters} adapters written", flush=True)
        adapter_bytes = (root / names[0] / "adapter_model.safetensors").stat().st_size
        if adapter_bytes * a.adapters <= budget:
            print(f"warning: the host budget ({budget} bytes) holds all {a.adapters} "
                  f"adapters ({adapter_bytes} bytes each): nothing will be evicted", flush=True)
        resident, fresh_names = names[: a.slots], names[a.slots : a.slots + a.cold_loads]
        after_names = names[a.slots + a.cold_loads : a.slots + 2 * a.cold_loads]
        args = ["--adapter-dir", root, "--enable-admin", "--max-active-adapters", a.slots,
                "--max-lora-rank", 16, "--max-seq-len", 512, "--kv-cache-memory", "1GiB",
                "--max-host-adapter-memory", budget, "--dtype", a.dtype]
        with Server(args + ["--metrics-port", 0]) as server:
            load(server.target, resident, a.slots, 4)  # warm-up: each resident one loaded
            # Cold loads on a server whose host budget has room (then unloaded again) ...
            fresh = cold_loads(server, root, fresh_names)
            admin = pb_grpc.AdapterAdminStub(grpc.insecure_channel(server.target))
            for name in fresh_names:
                admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=f"cold-{name}"))
            for run in range(a.runs):
                seed = a.seed + run
                order = ["resident", "many"] if run % 2 == 0 else ["many", "resident"]
                row: dict = {"seed": seed, "order": order}
                for kind in order:
                    if kind == "resident":  # back in host memory and slots, untimed
                        load(server.target, resident, a.slots, 1)
                    ids = shuffled(names if kind == "many" else resident, seed)
                    before = scrape(server.metrics_port)
                    result = load(server.target, ids, a.requests, a.new_tokens, a.clients,
                                  seed=seed)
                    row[kind] = {"tokens_per_s": result.output_tokens_per_s,
                                 "distinct_adapters": len(result.requests_by_adapter),
                                 "wall_s": result.wall_s, "ttft_p50_s": result.ttft.p50,
                                 "e2e_max_s": result.e2e.max,
                                 **delta(scrape(server.metrics_port), before)}
                    print(f"{time.strftime('%H:%M:%S')} run {run + 1} {kind}: {row[kind]}",
                          flush=True)
                row["ratio"] = row["many"]["tokens_per_s"] / row["resident"]["tokens_per_s"]
                row["load_average_after"] = os.getloadavg()
                runs.append(row)
                m = row["many"]
                print(f"run {run + 1} (seed {seed}, {' then '.join(order)}): {a.adapters} "
                      f"adapters {m['tokens_per_s']:.1f} tok/s ({m['distinct_adapters']} "
                      f"distinct, {m['disk_reads']} disk reads, {m['host_evictions']} host "
                      f"evictions), {a.slots} resident {row['resident']['tokens_per_s']:.1f} "
                      f"tok/s", flush=True)
            host_after_runs = _memory(server.target, "adapters_host")
            # ... and after the many runs, with the host budget full.
            after = cold_loads(server, root, after_names)
            fp32_tokens = greedy_tokens(server.target, prompts, a.new_tokens)
            fp32_mem = _memory(server.target, "base_model")
        t0 = time.perf_counter()
        with Server(args + ["--quantize", "nf4"]) as server:
            nf4_tokens = greedy_tokens(server.target, prompts, a.new_tokens)
            nf4_wall = time.perf_counter() - t0
            nf4_tps = load(server.target, names[:4], 8, a.new_tokens, clients=8,
                           distribution="uniform").output_tokens_per_s
            nf4_mem = _memory(server.target, "base_model")
    many = [r["many"] for r in runs]
    result = {
        "many_adapters": a.adapters, "slots": a.slots, "host_budget_bytes": budget,
        "adapter_bytes": adapter_bytes, "adapters_total_bytes": adapter_bytes * a.adapters,
        "traffic": TRAFFIC, "requests_per_load_run": a.requests, "clients": a.clients,
        "seeds": [r["seed"] for r in runs],
        "many_tokens_per_s": median([r["tokens_per_s"] for r in many]),
        "resident_tokens_per_s": median([r["resident"]["tokens_per_s"] for r in runs]),
        "many_vs_resident_ratio": median([r["ratio"] for r in runs]),
        "many_distinct_adapters_min": min(r["distinct_adapters"] for r in many),
        "many_disk_reads_per_run": [r["disk_reads"] for r in many],
        "many_evicting_loads_per_run": [r["host_evictions"] for r in many],
        "many_slot_writes_per_run": [r["slot_writes"] for r in many],
        "resident_disk_reads_per_run": [r["resident"]["disk_reads"] for r in runs],
        "disk_reads_counted_as": DISK_READS, "evicting_loads_counted_as": EVICTING_LOADS,
        "adapters_host_bytes_after_runs": host_after_runs,
        "cold_load_fresh_server": fresh, "cold_load_after_many_runs": after,
        "fp32_base_bytes": fp32_mem, "nf4_base_bytes": nf4_mem,
        "nf4_memory_ratio": nf4_mem / fp32_mem,
        "nf4_memory_ratio_basis": (
            "like with like: both sides are the `base_model` part of GetModelInfo.memory "
            "(parameters and buffers); the nf4 side counts bitsandbytes' packed 4-bit "
            "weights, not their quantization statistics (absmax, about 3% of the packed "
            "bytes), which the server's memory report leaves out"),
        "nf4_tokens_per_s_8_clients": nf4_tps,
        "nf4_greedy_agreement": agreement(fp32_tokens, nf4_tokens),
        "nf4_startup_and_prompts_s": nf4_wall,
        "load_average_1_5_15_min": load_average | {"end": os.getloadavg()},
    }
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (str, dict))]
    rows += [(f"cold ({k.removeprefix('cold_load_')}) {n}", x) for k in
             ("cold_load_fresh_server", "cold_load_after_many_runs") for n, x in result[k].items()]
    print_table(f"adapters (median of {len(runs)} runs)",
                [(k, str(v) if isinstance(v, list) else v) for k, v in rows])
    path = write_results("adapters", {**result, "runs": runs, "settings": vars(a)})
    print(f"wrote {path}")
    return result


def _ms(seconds: float) -> float:
    return 1000 * seconds


def _info(target: str) -> pb.GetModelInfoResponse:
    return pb_grpc.TextGenerationStub(grpc.insecure_channel(target)).GetModelInfo(
        pb.GetModelInfoRequest())


def _memory(target: str, part: str) -> int:
    return next(m.bytes for m in _info(target).memory if m.part == part)


if __name__ == "__main__":
    main()
