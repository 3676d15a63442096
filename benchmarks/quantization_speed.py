"""Serving speed of the quantized base (`--quantize int8|int4`) and bf16 against fp32, in one run.

The default model, one `switchboard serve` per variant (none = fp32, int8, int4, all in
--dtype float32; bf16 = --dtype bfloat16, unquantized), started together and measured in
turn, round by round (this VM's speed drifts over minutes, so each round's figures are
taken back to back and the ratios are per round): a single stream (one client, --single-requests
requests), the base model with 32 clients, and 16 rank-16 all-projection LoRA adapters
(benchmarks.serving.make_adapters) with 32 clients, --new-tokens each (EOS ignored),
through the project's load generator. Medians over --rounds of the tokens/s and of the
per-round ratios to fp32, and each variant's adapter overhead ratio (16 adapters' tokens/s
over the base model's, per round).

    python -m benchmarks.quantization_speed [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import Server, median, print_table, write_results
from benchmarks.serving import load, make_adapters
from server.model_store import provision_default_model

VARIANTS = ("none", "int8", "int4")  # bf16 too with --variants none,int8,int4,bf16
# variant: its switchboard serve flags
FLAGS = {"none": ["--quantize", "none", "--dtype", "float32"],
         "int8": ["--quantize", "int8", "--dtype", "float32"],
         "int4": ["--quantize", "int4", "--dtype", "float32"],
         "bf16": ["--quantize", "none", "--dtype", "bfloat16"]}
MEASURES = ("single_stream", "base_32_clients", "adapters_32_clients")


def summarize(rounds: list[dict], variants: list[str], a) -> dict:
    """Medians over the rounds so far (a round may lack the variants not yet measured)."""
    variants = [v for v in variants if any(v in rd for rd in rounds)]
    summary = {v: {m: median([rd[v][m] for rd in rounds if v in rd]) for m in MEASURES}
               for v in variants}
    ratios = {v: {m: median([rd[v][m] / rd["none"][m] for rd in rounds
                             if v in rd and "none" in rd]) for m in MEASURES}
              for v in variants if v != "none" and "none" in variants}
    # tokens/s with 16 adapters over tokens/s of the base model alone, per round
    overhead = {v: median([rd[v]["adapters_32_clients"] / rd[v]["base_32_clients"]
                           for rd in rounds if v in rd]) for v in variants}
    rows = [(f"{v} {m} tok/s", summary[v][m]) for v in variants for m in MEASURES]
    rows += [(f"{v}/fp32 {m}", ratios[v][m]) for v in ratios for m in MEASURES]
    rows += [(f"{v} adapter overhead ratio", overhead[v]) for v in variants]
    print_table(f"quantized base vs fp32 (median of {len(rounds)} rounds; {a.clients} "
                f"clients, {a.adapters} adapters rank {a.rank}, {a.new_tokens} new tokens)",
                rows)
    result = {"tokens_per_s": summary, "ratio_vs_fp32": ratios,
              "adapter_overhead_ratio": overhead, "flags": {v: FLAGS[v] for v in variants},
              "rounds": rounds,
              "settings": vars(a) | {"model": "smollm2-135m-instruct"}}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests per 32-client run")
    p.add_argument("--single-requests", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for every switchboard serve (repeatable)")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    model_dir = provision_default_model()
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        names = tuple(make_adapters(model_dir, Path(tmp), a.adapters, a.rank))
        args = ["--adapter-dir", tmp, "--max-batch-size", a.clients, "--max-active-adapters",
                a.adapters, "--max-lora-rank", a.rank, "--max-seq-len", 512,
                "--kv-cache-memory", "1GiB", *a.server_arg]
        servers = {v: Server([*args, *FLAGS[v]]) for v in variants}
        try:
            for s in servers.values():  # warm-up: kernels, allocator, adapter loading
                load(s.target, names, a.clients, a.clients, 4)
            for r in range(a.rounds):
                figures = {}
                for v, s in servers.items():
                    single = load(s.target, ("",), 1, a.single_requests, a.new_tokens)
                    base = load(s.target, ("",), a.clients, a.requests, a.new_tokens)
                    mixed = load(s.target, names, a.clients, a.requests, a.new_tokens)
                    figures[v] = {"single_stream": single.output_tokens_per_s,
                                  "base_32_clients": base.output_tokens_per_s,
                                  "adapters_32_clients": mixed.output_tokens_per_s}
                    print(f"round {r + 1} {v}: " + ", ".join(
                        f"{k} {x:.1f}" for k, x in figures[v].items()), flush=True)
                    # written after every measurement: a run cut short keeps its figures
                    result = summarize([*rounds, figures], variants, a)
                    path = write_results("quantization-speed", result)
                rounds.append(figures)
        finally:
            for s in servers.values():
                s.stop()
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
