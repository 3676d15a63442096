"""Throughput through the OpenAI-compatible HTTP API against the same through gRPC.

One server (default model, base weights, `--http-port 0`), 32 concurrent streaming clients
per protocol, each request a chat prompt from the load generator's built-in set, greedy,
--new-tokens tokens with EOS ignored, so both protocols ask for exactly the same work. The
gRPC clients call GenerateStream with `messages`; the HTTP clients POST
/v1/chat/completions with `stream: true` over one keep-alive connection each and parse the
server-sent events (a lean client, like the gRPC stub, so that the clients' own cost on a
shared CPU does not decide the figure). The two protocols alternate within every round
(which goes first alternates too); the figure is the median over --runs rounds of the
HTTP/gRPC ratio of generated tokens per second.

    python -m benchmarks.http [--runs 3] [--clients 32] [--requests 64] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

import grpc

from benchmarks.common import Server, median, print_table, write_results
from clients.workload import builtin_prompts
from server.model_store import provision_default_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc


def _messages(i: int) -> list[dict[str, str]]:
    prompts = builtin_prompts()
    return [{"role": r, "content": c} for r, c in prompts[i % len(prompts)].messages]


def _run(clients: int, requests: int, call) -> tuple[float, int]:
    """`requests` calls spread over `clients` threads -> (seconds, generated tokens)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    tokens = [0] * clients
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        state: dict = {}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            try:
                tokens[w] += call(i, state)
            except BaseException as e:  # reported after the run
                errors.append(e)
                return
        if "conn" in state:
            state["conn"].close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]!r}")
    return seconds, sum(tokens)


def grpc_call(stub, new_tokens: int):
    def call(i: int, state: dict) -> int:
        req = pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in _messages(i)]),
            stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True))
        n = 0
        for msg in stub.GenerateStream(req, timeout=600):
            n = msg.completion_tokens or n
        return n

    return call


def http_call(port: int, model: str, new_tokens: int):
    def call(i: int, state: dict) -> int:
        conn = state.get("conn")
        if conn is None:
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"model": model, "messages": _messages(i), "max_tokens": new_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        n = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            usage = json.loads(data).get("usage")
            if usage:
                n = usage["completion_tokens"]
        resp.read()
        return n

    return call


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="per protocol per round")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `switchboard serve` argument (repeatable)")
    a = p.parse_args(argv)
    model_dir = provision_default_model()
    rounds = []
    with Server(["--base-model", model_dir, "--http-port", "0", "--max-batch-size",
                 str(a.clients), *a.server_arg]) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        model = str(model_dir)
        calls = {"grpc": grpc_call(stub, a.new_tokens),
                 "http": http_call(server.http_port, model, a.new_tokens)}
        _run(a.clients, a.clients, calls["grpc"])  # warm both paths
        _run(a.clients, a.clients, calls["http"])
        for r in range(a.runs):
            order = ["http", "grpc"] if r % 2 == 0 else ["grpc", "http"]
            result = {}
            for name in order:
                seconds, tokens = _run(a.clients, a.requests, calls[name])
                if tokens != a.requests * a.new_tokens:
                    raise RuntimeError(f"{name}: {tokens} tokens, expected "
                                       f"{a.requests * a.new_tokens}")
                result[name] = tokens / seconds
            result["ratio"] = result["http"] / result["grpc"]
            rounds.append(result)
            print(f"round {r + 1}: http {result['http']:.1f} tok/s, grpc "
                  f"{result['grpc']:.1f} tok/s, ratio {result['ratio']:.3f}", flush=True)
    out = {
        "http_tokens_per_s": median([x["http"] for x in rounds]),
        "grpc_tokens_per_s": median([x["grpc"] for x in rounds]),
        "ratio_http_vs_grpc": median([x["ratio"] for x in rounds]),
        "rounds": rounds,
        "settings": {"runs": a.runs, "clients": a.clients, "requests": a.requests,
                     "new_tokens": a.new_tokens, "model": "smollm2-135m-instruct",
                     "server_arg": a.server_arg, "stream": True, "greedy": True},
    }
    print_table(f"HTTP vs gRPC, {a.clients} streaming clients (median of {a.runs} rounds)", [
        ("HTTP tok/s", out["http_tokens_per_s"]), ("gRPC tok/s", out["grpc_tokens_per_s"]),
        ("HTTP / gRPC", out["ratio_http_vs_grpc"])])
    print(f"wrote {write_results('http', out)}")
    return out


if __name__ == "__main__":
    main()
