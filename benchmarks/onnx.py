"""The ONNX path against the PyTorch engine on one hot adapter, each variant paired with
its own PyTorch baseline measured back to back in the same server.

Default model in fp32 with one LoRA adapter (rank 16, all seven projections, non-zero),
made here. The adapter is exported three times (`trainer export-onnx` code: fp32, int8,
int4); export time, file size and the exporter's parity figures are recorded. Then, per
variant V, one server started with `--onnx --onnx-variant V` serves both paths through
gRPC: the PyTorch engine with the adapter unmerged (requests with engine_path PYTORCH)
and ONNX V (engine_path ONNX). Each run measures the two paths back to back, in
alternating order (PyTorch first on even runs, ONNX first on odd ones):
  - single-stream decode tokens/s: one greedy request, N new tokens (EOS ignored), decode
    rate after the first token;
  - 8-stream throughput: 8 concurrent greedy requests (different chat prompts), generated
    tokens / wall time.
A variant's speed-up is the median over runs of (ONNX rate / paired PyTorch rate of the
same run); the medians of the rates themselves are recorded too.

Quality, against the reference = the PyTorch engine's free-running greedy answers to the
8 prompts (first 8-stream run of the first server):
  - free-running agreement: each path generates on its own; per prompt, the tokens before
    the first divergence from the reference, summed over the 8 prompts / all reference
    tokens (1.0 = the same answers token for token); the first-divergence index of each
    prompt is recorded;
  - teacher-forced agreement: given the prompt and the first i reference tokens, the share
    of steps (i < 16, 8 prompts) where the path chooses the reference's next token.
The paired PyTorch runs of the later servers are scored against the reference too (a
check that the reference is reproducible: expected 1.0).

"Fastest" is the fastest variant (single-stream paired speed-up) among those that pass
QUALITY_BAR (below); the fastest variant regardless of quality is recorded beside it.
"activation_quantization": whether the exporter's MatMulNBits settings (accuracy_level)
quantize activations on this machine's ONNX Runtime, checked on one MatMul
(activation_check). Where llama-cpp-python is installed, the base model's GGUF runs
too, for reference.
The figures of the results file this run replaces are kept under "previous".

    python -m benchmarks.onnx [--runs 3] [--new-tokens 128] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc

from benchmarks.common import RESULTS, Server, median, print_table, write_results
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

ADAPTER = "hot"
VARIANTS = ("fp32", "int8", "int4")
PATHS = {"pytorch": pb.ENGINE_PATH_PYTORCH, "onnx": pb.ENGINE_PATH_ONNX}
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
FORCED_TOKENS = 16

# A variant's speed counts as "the same service, faster" only when it passes both:
QUALITY_BAR = {
    "teacher_forced_agreement_min": 0.95,
    "free_running_agreement_min": 0.5,
    "why": (
        "teacher-forced >= 0.95: given the same context, at most 1 step in 20 picks another "
        "token than the PyTorch engine (the exporter's own floor for int8, ParityConfig). "
        "Free-running >= 0.5: on average the first half of each answer (64 of 128 tokens) "
        "is the PyTorch engine's answer token for token; below that, most of the text a "
        "user reads differs from the unmerged adapter's, so the speed is not the same "
        "service's. fp32 (the same arithmetic, merged) is expected at 1.0 on both."),
}


def _request(prompt: str, new_tokens: int, path: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=ADAPTER, engine_path=path,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        response=pb.ResponseOptions(token_ids=True))


def single_stream(stub, new_tokens: int, path: int) -> float:
    """Decode tokens/s of one greedy request, after its first token."""
    times, n = [], 0
    for msg in stub.GenerateStream(_request(PROMPTS[0], new_tokens, path)):
        if msg.token_ids:
            times.append(time.perf_counter())
            n += len(msg.token_ids)
    return (n - 1) / (times[-1] - times[0])


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


def first_divergence(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where `got` leaves `want`; None when it never does."""
    i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if i is None and len(got) < len(want):
        return len(got)
    return i


def free_running(got: list[list[int]], want: list[list[int]]) -> dict:
    """Free-running greedy agreement: tokens before the first divergence over all prompts,
    / all reference tokens; with each prompt's first-divergence index (None: identical)."""
    firsts = [first_divergence(g, w) for g, w in zip(got, want, strict=True)]
    same = sum(len(w) if f is None else f for f, w in zip(firsts, want, strict=True))
    return {"agreement": same / max(sum(map(len, want)), 1), "first_divergence": firsts,
            "prompts_identical": sum(f is None for f in firsts), "prompts": len(want)}


def forced_agreement(stub, want: list[list[int]], path: int, tokens: int = FORCED_TOKENS
                     ) -> float:
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


def paired_runs(stub, runs: int, new_tokens: int) -> dict:
    """Both paths, back to back in each run, alternating which goes first."""
    for path in PATHS.values():  # warm: first requests and first batch of 8 rows
        single_stream(stub, 8, path)
        multi_stream(stub, 8, path)
    single: dict[str, list[float]] = {k: [] for k in PATHS}
    tput: dict[str, list[float]] = {k: [] for k in PATHS}
    tokens: dict[str, list[list[list[int]]]] = {k: [] for k in PATHS}
    served: dict[str, set[int]] = {k: set() for k in PATHS}
    for r in range(runs):
        for name in PATHS if r % 2 == 0 else reversed(PATHS):
            single[name].append(single_stream(stub, new_tokens, PATHS[name]))
    for r in range(runs):
        for name in PATHS if r % 2 == 0 else reversed(PATHS):
            rate, out, paths = multi_stream(stub, new_tokens, PATHS[name])
            tput[name].append(rate)
            tokens[name].append(out)
            served[name] |= paths
    return {"single": single, "tput": tput, "tokens": tokens, "served": served}


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def activation_check(variants: list[str], rows: tuple[int, ...] = (1, 8)) -> dict:
    """Does the exporter's quantization (trainer/onnx_export.py:_quantize, MatMulNBits with
    its accuracy_level) quantize activations on this machine's ONNX Runtime? One MatMul
    [576 -> 64] (the default model's hidden size) is quantized by that same code; its
    output is compared with (a) the same node set to accuracy level 1 (fp32 compute on the
    same quantized weights) and (b) that fp32 node fed the input already rounded to int8
    per block of 32 along the input (symmetric, scale max|x|/127). (b) near float rounding
    while (a) is far larger: the node quantized its input to int8 blocks."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from trainer.onnx_export import _quantize

    k, n, block = 576, 64, 32
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    def run(m, x):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    def int8_blocks(x):
        b = x.reshape(x.shape[0], -1, block)
        scale = np.abs(b).max(-1, keepdims=True) / 127
        scale[scale == 0] = 1
        return (np.round(b / scale) * scale).reshape(x.shape).astype(np.float32)

    out: dict = {"onnxruntime": ort.__version__, "matmul": [k, n], "method": (
        "rel diff = max|y - y'| / max|y_fp32|; 'vs_fp32_compute': the node at "
        "accuracy_level 1; 'vs_int8_block_input': accuracy_level 1 fed the input rounded "
        "to int8 per block of 32 (symmetric)")}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "matmul.onnx"
        onnx.save(model, src)
        for variant in variants:
            if variant == "fp32":
                continue
            dst = Path(tmp) / f"{variant}.onnx"
            _quantize(src, dst, variant)
            q = onnx.load(dst)
            node = next(nd for nd in q.graph.node if nd.op_type == "MatMulNBits")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            fp32 = onnx.ModelProto()
            fp32.CopyFrom(q)
            node1 = next(nd for nd in fp32.graph.node if nd.op_type == "MatMulNBits")
            kept = [a for a in node1.attribute if a.name != "accuracy_level"]
            del node1.attribute[:]
            node1.attribute.extend([*kept, helper.make_attribute("accuracy_level", 1)])
            rec = {key: attrs.get(key) for key in ("bits", "block_size", "accuracy_level")}
            quantized = True
            for m in rows:
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[:, 5] = 40.0  # one outlier channel
                y, y1, yq = run(q, x), run(fp32, x), run(fp32, int8_blocks(x))
                ref = float(np.abs(y1).max())
                a = float(np.abs(y - y1).max()) / ref
                b = float(np.abs(y - yq).max()) / ref
                rec[f"rows_{m}"] = {"rel_diff_vs_fp32_compute": a,
                                    "rel_diff_vs_int8_block_input": b}
                quantized &= b < a / 10
            rec["activations_quantized_int8_blocks"] = quantized
            out[variant] = rec
    return out


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


def previous_figures(path: Path) -> dict | None:
    """The headline figures of the results file this run replaces (either layout)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keep = ("single_stream_tokens_per_s", "throughput_8_streams_tokens_per_s",
            "teacher_forced_agreement", "free_running_agreement", "single_stream_speedup",
            "throughput_speedup", "passes_quality_bar")
    prev = {k: old.get(k) for k in ("date", "command", "git_commit") if k in old}
    prev["cpu"] = (old.get("machine") or {}).get("cpu")
    prev["config"] = old.get("config")
    if "variants" in old:  # this layout
        prev["variants"] = {v: {k: r[k] for k in keep if k in r}
                            for v, r in old["variants"].items()}
        prev["fastest_passing"] = old.get("fastest_passing")
        return prev
    engines = old.get("engines") or {}  # the earlier layout: one PyTorch baseline
    prev["note"] = ("one PyTorch baseline for all variants (first server only); "
                    "free-running agreement named greedy_agreement_with_pytorch")
    prev["engines"] = {name: {
        "single_stream_tokens_per_s": r.get("single_stream_tokens_per_s"),
        "throughput_8_streams_tokens_per_s": r.get("throughput_8_streams_tokens_per_s"),
        "teacher_forced_agreement": r.get("teacher_forced_agreement_with_pytorch"),
        "free_running_agreement": r.get("greedy_agreement_with_pytorch")}
        for name, r in engines.items()}
    prev["fastest_onnx_single_stream_speedup"] = old.get("fastest_onnx_single_stream_speedup")
    return prev


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="1 run, 32 new tokens")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens = 1, 32
    from benchmarks.serving import make_adapters
    from server.model_store import provision_default_model
    from trainer.onnx_export import ParityError, export_onnx

    t_start = time.perf_counter()
    previous = previous_figures(args.out)
    model_dir = provision_default_model()
    results: dict = {"config": {"model": "SmolLM2-135M-Instruct", "dtype": "float32",
                                "adapter": "lora r16, 7 projections", "runs": args.runs,
                                "new_tokens": args.new_tokens, "streams": 8,
                                "teacher_forced_tokens_per_prompt": FORCED_TOKENS,
                                "prompts": len(PROMPTS)},
                     "quality_bar": QUALITY_BAR}
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
        results["activation_quantization"] = activation_check(list(exports))
        variants: dict[str, dict] = {}
        reference: list[list[int]] = []
        pytorch_ref: dict = {"reference": None, "repeats": {}}
        for variant in (v for v in VARIANTS if v in exports):
            with Server(["--adapter-dir", root, "--onnx", "--onnx-variant", variant,
                         "--max-new-tokens", args.new_tokens]) as server:
                stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target))
                m = paired_runs(stub, args.runs, args.new_tokens)
                if not reference:
                    reference = m["tokens"]["pytorch"][0]
                    pytorch_ref["reference"] = f"{variant} server, 8-stream run 0"
                    pytorch_ref["teacher_forced_agreement"] = forced_agreement(
                        stub, reference, PATHS["pytorch"])
                    pytorch_ref["kernels"] = ("torch" if any(
                        "PyTorch ops only" in line for line in server.lines) else "native")
                pytorch_ref["repeats"][variant] = [
                    free_running(t, reference)["agreement"] for t in m["tokens"]["pytorch"]]
                free = free_running(m["tokens"]["onnx"][0], reference)
                single_ratios = _ratios(m["single"]["onnx"], m["single"]["pytorch"])
                tput_ratios = _ratios(m["tput"]["onnx"], m["tput"]["pytorch"])
                row = {
                    "single_stream_tokens_per_s": median(m["single"]["onnx"]),
                    "throughput_8_streams_tokens_per_s": median(m["tput"]["onnx"]),
                    "paired_pytorch_single_stream_tokens_per_s": median(m["single"]["pytorch"]),
                    "paired_pytorch_throughput_8_streams_tokens_per_s":
                        median(m["tput"]["pytorch"]),
                    "single_stream_speedup": median(single_ratios),
                    "throughput_speedup": median(tput_ratios),
                    "teacher_forced_agreement": forced_agreement(stub, reference,
                                                                 PATHS["onnx"]),
                    "free_running_agreement": free["agreement"],
                    "free_running_first_divergence": free["first_divergence"],
                    "free_running_prompts_identical": free["prompts_identical"],
                    "free_running_same_in_every_run": all(
                        t == m["tokens"]["onnx"][0] for t in m["tokens"]["onnx"]),
                    "runs": {"single_stream_onnx": m["single"]["onnx"],
                             "single_stream_pytorch": m["single"]["pytorch"],
                             "single_stream_ratio": single_ratios,
                             "throughput_onnx": m["tput"]["onnx"],
                             "throughput_pytorch": m["tput"]["pytorch"],
                             "throughput_ratio": tput_ratios},
                    "engine_paths": {k: sorted(pb.EnginePath.Name(p) for p in v)
                                     for k, v in m["served"].items()},
                }
                row["passes_quality_bar"] = (
                    row["teacher_forced_agreement"] >= QUALITY_BAR["teacher_forced_agreement_min"]
                    and row["free_running_agreement"] >= QUALITY_BAR["free_running_agreement_min"])
                variants[variant] = row
        results["pytorch_reference"] = pytorch_ref
        results["variants"] = variants

    def pick(names: list[str]) -> dict | None:
        if not names:
            return None
        v = max(names, key=lambda n: variants[n]["single_stream_speedup"])
        return {"variant": v, "single_stream_speedup": variants[v]["single_stream_speedup"],
                "throughput_speedup": variants[v]["throughput_speedup"],
                "passes_quality_bar": variants[v]["passes_quality_bar"]}

    results["fastest_passing"] = pick([v for v in variants if variants[v]["passes_quality_bar"]])
    results["fastest_any"] = pick(list(variants))
    ref = llama_cpp_reference(args.new_tokens, args.runs)
    results["llama_cpp"] = ref or {"skipped": "llama-cpp-python not installed"}
    if ref and "single_stream_tokens_per_s" in ref and results["fastest_passing"]:
        best = variants[results["fastest_passing"]["variant"]]["single_stream_tokens_per_s"]
        ref["ratio_fastest_passing_onnx_to_llama_cpp"] = best / ref["single_stream_tokens_per_s"]
    results["benchmark_seconds"] = time.perf_counter() - t_start
    results["previous"] = previous
    table = []
    for v, r in variants.items():
        table += [(f"{v}: PyTorch (paired) single-stream tok/s",
                   r["paired_pytorch_single_stream_tokens_per_s"]),
                  (f"{v}: ONNX single-stream tok/s", r["single_stream_tokens_per_s"]),
                  (f"{v}: single-stream speed-up (median of paired ratios)",
                   r["single_stream_speedup"]),
                  (f"{v}: PyTorch (paired) 8-stream tok/s",
                   r["paired_pytorch_throughput_8_streams_tokens_per_s"]),
                  (f"{v}: ONNX 8-stream tok/s", r["throughput_8_streams_tokens_per_s"]),
                  (f"{v}: 8-stream speed-up (median of paired ratios)",
                   r["throughput_speedup"]),
                  (f"{v}: teacher-forced agreement ({FORCED_TOKENS} tokens)",
                   r["teacher_forced_agreement"]),
                  (f"{v}: free-running agreement", r["free_running_agreement"]),
                  (f"{v}: passes the quality bar", str(r["passes_quality_bar"]))]
    for v, e in exports.items():
        table += [(f"export {v} seconds", e["export_seconds"]),
                  (f"export {v} MB", e["size_bytes"] / 1e6),
                  (f"export {v} parity agreement", e["parity"]["greedy_agreement"])]
    for v, rec in results["activation_quantization"].items():
        if isinstance(rec, dict) and "bits" in rec:
            table.append((f"{v}: MatMulNBits accuracy_level {rec['accuracy_level']} "
                          "quantizes activations", str(rec["activations_quantized_int8_blocks"])))
    for key in ("fastest_passing", "fastest_any"):
        f = results[key]
        table.append((key.replace("_", " "), "none" if f is None else
                      f"{f['variant']} {f['single_stream_speedup']:.2f}x"))
    print_table("ONNX path vs PyTorch engine (one LoRA adapter, default model)", table)
    path = write_results("onnx", results, args.out)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
