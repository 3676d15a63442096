"""The cost of structured output: decode throughput with and without a JSON schema, same
server, same run.

Default model, 4 LoRA adapters (rank 8, q and v), --clients concurrent gRPC clients
(default 16), --requests requests per phase, half greedy and half sampled (temperature
0.7, top-p 0.9, seeded), chat prompts asking for a city as JSON, adapters in turn. Each
round runs two phases:
- schema: every request carries the nested schema (tests/server/test_structured_output.py
  has the same shape): objects, arrays, enums, an integer range, bounded strings;
- free: the same requests without the schema, each with `ignore_eos` and exactly as
  many new tokens as its constrained twin produced, so both phases generate the same
  tokens per request from the same prompts at the same concurrency, and the ratio is the
  grammar's own cost (masks, their application, advancing the matchers).
The phases alternate in order from round to round; the table gives the medians over
--rounds and the median of the per-round ratios.

    python -m benchmarks.structured [--rounds 3] [--requests 64] [--clients 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from benchmarks.common import Server, median, print_table, write_results
from benchmarks.serving import make_adapters
from server.model_store import provision_default_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

WORD = {"type": "string", "pattern": "^[A-Za-z ]*$", "maxLength": 12}
SCHEMA = {
    "type": "object",
    "properties": {
        "city": WORD,
        "kind": {"enum": ["capital", "port", "town"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "location": {"type": "object",
                     "properties": {"country": WORD, "coast": {"type": "boolean"}},
                     "required": ["country", "coast"], "additionalProperties": False},
        "landmarks": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"name": WORD, "visited": {"type": "boolean"}},
            "required": ["name"], "additionalProperties": False}},
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold", "warm"]},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["city", "kind", "location", "tags"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Hanoi", "Rome", "Dakar",
          "Perth", "Bergen", "Porto", "Kyoto", "Lagos", "Turin", "Delhi"]


def request(i: int, adapters: list[str], *, schema: bool, new_tokens: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        adapter_id=adapters[i % len(adapters)],
        messages=pb.ChatMessages(messages=[pb.ChatMessage(
            role="user", content=f"Describe the city of {CITIES[i % len(CITIES)]} as JSON.")]),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=not schema))
    if i % 2:
        req.sampling.temperature = 0.7
        req.sampling.top_p = 0.9
        req.sampling.seed = i
    if schema:
        req.response_format.json_schema = json.dumps(SCHEMA)
    return req


def phase(stub, requests: list[pb.GenerateRequest], clients: int) -> tuple[float, list[int]]:
    """-> (generated tokens per second over the phase's wall time, tokens per request)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(lambda r: stub.Generate(r, timeout=900), requests))
    wall = time.perf_counter() - t0
    tokens = [r.completion_tokens for r in out]
    return sum(tokens) / wall, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--quick", action="store_true", help="1 round of 16 requests")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.requests = 1, 16
    model_dir = provision_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = make_adapters(model_dir, root, 4, 8)
        server = Server(["--adapter-dir", root, "--preload", ",".join(adapters),
                         "--max-batch-size", str(max(a.clients, 1)), "--max-seq-len", "256",
                         "--kv-cache-memory", "512MiB"])
        try:
            stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
            stub.Generate(request(0, adapters, schema=True, new_tokens=8), timeout=300)  # warm
            rows = []
            for rnd in range(a.rounds):
                constrained = [request(i, adapters, schema=True, new_tokens=a.max_new_tokens)
                               for i in range(a.requests)]
                if rnd % 2 == 0:
                    schema_tps, tokens = phase(stub, constrained, a.clients)
                    free = [request(i, adapters, schema=False, new_tokens=n)
                            for i, n in enumerate(tokens)]
                    free_tps, free_tokens = phase(stub, free, a.clients)
                else:  # free first: the token counts come from the previous round
                    free = [request(i, adapters, schema=False, new_tokens=n)
                            for i, n in enumerate(rows[-1]["tokens"])]
                    free_tps, free_tokens = phase(stub, free, a.clients)
                    schema_tps, tokens = phase(stub, constrained, a.clients)
                rows.append({"round": rnd, "schema_tok_s": schema_tps, "free_tok_s": free_tps,
                             "ratio": schema_tps / free_tps, "tokens": tokens,
                             "free_tokens": free_tokens})
                print(f"round {rnd}: schema {schema_tps:.1f} tok/s, free {free_tps:.1f} "
                      f"tok/s, ratio {schema_tps / free_tps:.3f}, {sum(tokens)} tokens",
                      flush=True)
        finally:
            server.stop()
    result = {
        "config": {"rounds": a.rounds, "requests": a.requests, "clients": a.clients,
                   "adapters": len(adapters), "max_new_tokens": a.max_new_tokens,
                   "schema": SCHEMA},
        "schema_tok_s": median([r["schema_tok_s"] for r in rows]),
        "free_tok_s": median([r["free_tok_s"] for r in rows]),
        "ratio_schema_over_free": median([r["ratio"] for r in rows]),
        "mean_answer_tokens": median([sum(r["tokens"]) / len(r["tokens"]) for r in rows]),
        "rounds": [{k: v for k, v in r.items() if k != "free_tokens"} for r in rows],
    }
    path = write_results("structured", result)
    print_table(f"structured output: {a.clients} clients, {a.requests} requests/phase, "
                f"median of {a.rounds} rounds", [
                    ("free tok/s (same tokens, no schema)", result["free_tok_s"]),
                    ("schema tok/s", result["schema_tok_s"]),
                    ("ratio schema / free", result["ratio_schema_over_free"]),
                    ("answer tokens (mean)", result["mean_answer_tokens"]),
                ])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
