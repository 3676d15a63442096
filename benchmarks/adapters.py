"""Adapter lifecycle benchmarks on the default model (fp32 unless stated).

(a) 256 registered LoRA adapters (rank 16, all seven projections), 16 device slots,
    Zipf-distributed traffic (s=1.1) from 32 clients, against the same traffic over 16
    adapters that all stay resident: throughput ratio.
(b) Cold load of one rank-16 all-projection adapter from local disk (its files dropped
    from the page cache first) to usable (LoadAdapter round trip, then the first token of
    a request on it): p50 and p99, on the fresh server (host budget with room) and after
    the Zipf runs (budget full: each load evicts).
(c) nf4 base: resident weight memory against fp32, throughput, and greedy-token agreement
    with the fp32 server on the benchmark prompts.

    python -m benchmarks.adapters [--requests 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from benchmarks.common import Server, median, print_table, write_results
from clients.loadtest import LoadTestConfig, run_loadtest
from server.model_store import provision_default_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def load(target, adapters, requests, new_tokens, clients=32, distribution="zipf"):
    cfg = LoadTestConfig(target=target, concurrency=clients, duration_s=None,
                         num_requests=requests, adapters=tuple(adapters),
                         distribution=distribution, zipf_exponent=1.1,
                         max_new_tokens=new_tokens, ignore_eos=True, progress=False, seed=1)
    result = run_loadtest(cfg)
    if result.requests_failed:
        raise RuntimeError(f"{result.requests_failed} requests failed: {result.errors_by_code}")
    return result


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


def cold_loads(target: str, root: Path, names: list[str],
               count: int) -> tuple[list[float], list[float], list[float]]:
    """Per adapter never loaded before, its files out of the page cache: LoadAdapter round
    trip (read from disk, checked, in host memory, requests may use it), the part of it
    spent in the server's registry (its `load-seconds` trailer), and load plus the first
    token of a request (which also writes its device slot)."""
    channel = grpc.insecure_channel(target)
    admin, stub = pb_grpc.AdapterAdminStub(channel), pb_grpc.TextGenerationStub(channel)
    loads, in_server, first_tokens = [], [], []
    for name in names[:count]:
        evict_from_page_cache(root / name)
        t0 = time.perf_counter()
        _, call = admin.LoadAdapter.with_call(
            pb.LoadAdapterRequest(adapter_id=f"cold-{name}", path=name))
        loads.append(time.perf_counter() - t0)
        in_server.append(float(dict(call.trailing_metadata())["load-seconds"]))
        next(iter(stub.GenerateStream(pb.GenerateRequest(
            adapter_id=f"cold-{name}", prompt="Hi",
            stopping=pb.StoppingCriteria(max_new_tokens=1, ignore_eos=True)), timeout=60)))
        first_tokens.append(time.perf_counter() - t0)
    return sorted(loads), sorted(in_server), sorted(first_tokens)


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
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cold-loads", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.adapters, a.requests, a.new_tokens, a.cold_loads = 1, 48, 32, 16, 5
    model_dir = provision_default_model()
    prompts = ["What is the capital of France?", "Write a haiku about autumn.",
               "Explain photosynthesis in one sentence.", "List three prime numbers."]
    out: dict = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        names = write_adapters(model_dir, root, a.adapters, 16)
        os.sync()  # on disk before any is timed, not still being flushed from the cache
        args = ["--adapter-dir", root, "--enable-admin", "--max-active-adapters", a.slots,
                "--max-lora-rank", 16, "--max-seq-len", 512, "--kv-cache-memory", "1GiB"]
        with Server(args) as server:
            load(server.target, names[: a.slots], 8, 4)  # warm-up
            # Cold loads on a server whose host budget has room (then unloaded again) ...
            fresh, fresh_in_server, _ = cold_loads(server.target, root, names[a.slots:],
                                                   a.cold_loads)
            admin = pb_grpc.AdapterAdminStub(grpc.insecure_channel(server.target))
            for name in names[a.slots : a.slots + a.cold_loads]:
                admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=f"cold-{name}"))
            for run in range(a.runs):
                resident = load(server.target, names[: a.slots], a.requests, a.new_tokens)
                many = load(server.target, names, a.requests, a.new_tokens)
                out["runs"].append({
                    "resident_tokens_per_s": resident.output_tokens_per_s,
                    "many_tokens_per_s": many.output_tokens_per_s,
                    "ratio": many.output_tokens_per_s / resident.output_tokens_per_s,
                })
                print(f"run {run + 1}: {a.adapters} adapters {many.output_tokens_per_s:.1f} "
                      f"tok/s, {a.slots} resident {resident.output_tokens_per_s:.1f} tok/s",
                      flush=True)
            # ... and after the Zipf runs, with the host budget full: each load evicts.
            cold, cold_in_server, cold_first = cold_loads(server.target, root,
                                                          names[a.slots:], a.cold_loads)
            fp32_tokens = greedy_tokens(server.target, prompts, a.new_tokens)
            fp32_mem = _memory(server.target)
        t0 = time.perf_counter()
        with Server(args + ["--quantize", "nf4"]) as server:
            nf4_tokens = greedy_tokens(server.target, prompts, a.new_tokens)
            nf4_wall = time.perf_counter() - t0
            nf4_tps = load(server.target, names[:4], 8, a.new_tokens, clients=8,
                           distribution="uniform").output_tokens_per_s
            nf4_mem = _memory(server.target)
    runs = out["runs"]
    result = {
        "many_adapters": a.adapters, "slots": a.slots,
        "many_tokens_per_s": median([r["many_tokens_per_s"] for r in runs]),
        "resident_tokens_per_s": median([r["resident_tokens_per_s"] for r in runs]),
        "many_vs_resident_ratio": median([r["ratio"] for r in runs]),
        "cold_load_p50_ms": _rank_ms(cold, 0.5),
        "cold_load_p99_ms": _rank_ms(cold, 0.99),
        "cold_load_in_registry_p50_ms": _rank_ms(cold_in_server, 0.5),
        "cold_load_to_first_token_p50_ms": _rank_ms(cold_first, 0.5),
        "cold_load_fresh_server_p50_ms": _rank_ms(fresh, 0.5),
        "cold_load_fresh_server_p99_ms": _rank_ms(fresh, 0.99),
        "cold_load_fresh_server_in_registry_p50_ms": _rank_ms(fresh_in_server, 0.5),
        "fp32_base_bytes": fp32_mem, "nf4_base_bytes": nf4_mem,
        "nf4_memory_ratio": nf4_mem / fp32_mem,
        "nf4_tokens_per_s_8_clients": nf4_tps,
        "nf4_greedy_agreement": agreement(fp32_tokens, nf4_tokens),
        "nf4_startup_and_prompts_s": nf4_wall,
    }
    print_table(f"adapters (median of {len(runs)} runs)", list(result.items()))
    path = write_results("adapters", {**result, "runs": runs, "settings": vars(a)})
    print(f"wrote {path}")
    return result


def _rank_ms(sorted_seconds: list[float], q: float) -> float:
    """The value at rank q (nearest rank, no interpolation) of sorted seconds, in ms."""
    return 1000 * sorted_seconds[min(len(sorted_seconds) - 1, int(len(sorted_seconds) * q))]


def _memory(target: str) -> int:
    info = pb_grpc.TextGenerationStub(grpc.insecure_channel(target)).GetModelInfo(
        pb.GetModelInfoRequest())
    return next(m.bytes for m in info.memory if m.part == "base_model")


if __name__ == "__main__":
    main()
