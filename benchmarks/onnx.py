"""The ONNX path against the PyTorch engine on one hot adapter, all in one run.

Default model in fp32 with one LoRA adapter (rank 16, all seven projections, non-zero),
made here. The adapter is exported three times (`trainer export-onnx` code: fp32, int8,
int4); export time, file size and the exporter's parity figures are recorded. Then, per
variant, a real server started with `--onnx --onnx-variant V` is measured through gRPC:
(a) the PyTorch engine with the adapter unmerged (requests with engine_path PYTORCH, on
the first server), (b) ONNX fp32, (c) ONNX int8, (d) ONNX int4:
  - single-stream decode tokens/s: one greedy request, N new tokens (EOS ignored), decode
    rate after the first token, median of --runs;
  - 8-stream throughput: 8 concurrent greedy requests (different chat prompts), generated
    tokens / wall time;
  - greedy agreement with (a), free-running: generated tokens before the first
    divergence, over the 8 prompts; and teacher-forced: given the prompt and the first i
    tokens of (a), the share of steps (i < 16) where the path chooses (a)'s next token.
Where llama-cpp-python is installed, the base model's GGUF runs too, for reference.

    python -m benchmarks.onnx [--runs 3] [--new-tokens 128] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import threading
import time
from pathlib import Path

import grpc

from benchmarks.common import Server, median, print_table, write_results
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

ADAPTER = "hot"
PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning to program.",
    "What are the main causes of the seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a small coffee shop and explain why.",
]


def _request(prompt: str, new_tokens: int, path: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=ADAPTER, engine_path=path,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True))


def single_stream(stub, new_tokens: int, path: int, runs: int) -> float:
    rates = []
    for _ in range(runs):
        times, n = [], 0
        for msg in stub.GenerateStream(_request(PROMPTS[0], new_tokens, path)):
            if msg.token_ids:
                times.append(time.perf_counter())
                n += len(msg.token_ids)
        rates.append((n - 1) / (times[-1] - times[0]))
    return median(rates)


def multi_stream(stub, new_tokens: int, path: int, streams: int = 8
                 ) -> tuple[float, list[list[int]], set[int]]:
    out: list[list[int]] = [[] for _ in range(streams)]
    paths: set[int] = set()

    def one(i: int) -> None:
        r = stub.Generate(_request(PROMPTS[i % len(PROMPTS)], new_tokens, path))
        out[i] = list(r.token_ids)
        paths.add(r.engine_path)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(map(len, out)) / (time.perf_counter() - t0), out, paths


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    same = total = 0
    for g, w in zip(got, want, strict=True):
        same += next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                     min(len(g), len(w)))
        total += len(w)
    return same / max(total, 1)


def forced_agreement(stub, want: list[list[int]], path: int, tokens: int = 16) -> float:
    """Teacher-forced: given each prompt plus the first i reference tokens, does this path
    choose reference token i? Over the first `tokens` tokens of every prompt."""
    same = total = 0
    for prompt, ref in zip(PROMPTS, want, strict=False):
        ids = list(stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content=prompt)]))).token_ids)
        for i, token in enumerate(ref[:tokens]):
            r = stub.Generate(pb.GenerateRequest(
                adapter_id=ADAPTER, engine_path=path, token_ids=pb.TokenIds(ids=ids + ref[:i]),
                stopping=pb.StoppingCriteria(max_new_tokens=1, ignore_eos=True),
                response=pb.ResponseOptions(token_ids=True)))
            same += list(r.token_ids) == [token]
            total += 1
    return same / max(total, 1)


def llama_cpp_reference(new_tokens: int, runs: int) -> dict | None:
    """The base model's GGUF through llama-cpp-python, where installed (never required)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from server.model_store import cache_dir

    ggufs = sorted(cache_dir().rglob("*.gguf"))
    if not ggufs:
        return {"skipped": "llama-cpp-python is installed but no GGUF file is cached"}
    from llama_cpp import Llama

    llm = Llama(model_path=str(ggufs[0]), n_ctx=1024, verbose=False)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = llm(PROMPTS[0], max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    return {"gguf": ggufs[0].name, "single_stream_tokens_per_s": median(rates)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="1 run, 32 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens = 1, 32
    from benchmarks.serving import make_adapters
    from server.model_store import provision_default_model
    from server.onnx.export import ParityError, export_onnx

    model_dir = provision_default_model()
    results: dict = {"config": {"model": "SmolLM2-135M-Instruct", "dtype": "float32",
                                "adapter": "lora r16, 7 projections", "runs": args.runs,
                                "new_tokens": args.new_tokens, "streams": 8}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_adapters(model_dir, root, 1, 16)
        (root / "adapter-0").rename(root / ADAPTER)
        exports, failed = {}, {}
        for quantize in ("none", "int8", "int4"):
            variant = {"none": "fp32"}.get(quantize, quantize)
            t0 = time.perf_counter()
            try:
                rec = export_onnx(root / ADAPTER, quantize=quantize, base_model=str(model_dir))
            except ParityError as e:  # recorded, not served
                failed[variant] = str(e)
                continue
            exports[variant] = {"export_seconds": time.perf_counter() - t0,
                                "size_bytes": rec["size_bytes"], "parity": rec["parity"]}
        results["exports"] = exports
        results["exports_failed_parity"] = failed
        rows: dict[str, dict] = {}
        reference: list[list[int]] = []
        for i, variant in enumerate(v for v in ("fp32", "int8", "int4") if v in exports):
            with Server(["--adapter-dir", root, "--onnx", "--onnx-variant", variant,
                         "--max-new-tokens", args.new_tokens]) as server:
                stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
                todo = [("pytorch", pb.ENGINE_PATH_PYTORCH)] if i == 0 else []
                for name, path in [*todo, (f"onnx_{variant}", pb.ENGINE_PATH_ONNX)]:
                    single_stream(stub, 8, path, 1)  # warm
                    single = single_stream(stub, args.new_tokens, path, args.runs)
                    tput = [multi_stream(stub, args.new_tokens, path) for _ in range(args.runs)]
                    tokens = tput[0][1]
                    if name == "pytorch":
                        reference = tokens
                    rows[name] = {"single_stream_tokens_per_s": single,
                                  "throughput_8_streams_tokens_per_s": median([t[0] for t in tput]),
                                  "greedy_agreement_with_pytorch": agreement(tokens, reference),
                                  "teacher_forced_agreement_with_pytorch":
                                      forced_agreement(stub, reference, path),
                                  "engine_paths": sorted(pb.EnginePath.Name(p) for p in tput[0][2])}
        results["engines"] = rows
    base = rows["pytorch"]["single_stream_tokens_per_s"]
    best = max((rows[k]["single_stream_tokens_per_s"] for k in rows if k != "pytorch"),
               default=float("nan"))
    results["fastest_onnx_single_stream_speedup"] = best / base
    ref = llama_cpp_reference(args.new_tokens, args.runs)
    results["llama_cpp"] = ref or {"skipped": "llama-cpp-python not installed"}
    if ref and "single_stream_tokens_per_s" in ref:
        ref["ratio_fastest_onnx_to_llama_cpp"] = best / ref["single_stream_tokens_per_s"]
    table = []
    for name, r in rows.items():
        table += [(f"{name} single-stream tok/s", r["single_stream_tokens_per_s"]),
                  (f"{name} 8-stream tok/s", r["throughput_8_streams_tokens_per_s"]),
                  (f"{name} greedy agreement (free-running)",
                   r["greedy_agreement_with_pytorch"]),
                  (f"{name} greedy agreement (teacher-forced, 16 tokens)",
                   r["teacher_forced_agreement_with_pytorch"])]
    for v, e in exports.items():
        table += [(f"export {v} seconds", e["export_seconds"]),
                  (f"export {v} MB", e["size_bytes"] / 1e6),
                  (f"export {v} parity agreement", e["parity"]["greedy_agreement"])]
    table.append(("fastest ONNX / PyTorch single-stream", results[
        "fastest_onnx_single_stream_speedup"]))
    print_table("ONNX path vs PyTorch engine (one LoRA adapter, default model)", table)
    path = write_results("onnx", results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
