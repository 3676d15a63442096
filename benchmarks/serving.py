"""Serving throughput with many adapters in one batch, against PEFT in the same run.

The default model (or --base-model: a bundled model's short name such as gemma-3-270m, or a
model directory) on the server's device and in its dtype (--device, --dtype, passed to
`switchboard serve`; auto = fp32 on the CPU, bf16 on CUDA); 16 LoRA adapters of rank 16 on
all seven projections, non-zero, made here for the base's shapes; 32 concurrent streaming
clients through gRPC (the project's load generator), each request naming the next adapter in
turn, 128 new tokens each (EOS ignored), the load generator's built-in chat prompts.
Baselines in the same run: PEFT `generate(adapter_names=...)` in static batches of 32 on the
same prompts and adapters, right after the server's mixed-adapter run, and HF `generate` for
a single stream, alternated with the server's single stream (--single-pairs per run); the
baselines run in this process while the server idles, on the device and in the dtype the
server reports (GetModelInfo), LoRA weights included (PEFT's upcast of half-precision
adapters to fp32 is turned off, as the server keeps its slot table in the model's dtype);
the JSON records the dtypes each side really ran in. Each measurement is repeated --runs
times and the medians of the per-run ratios are reported.

    python -m benchmarks.serving [--base-model NAME_OR_PATH] [--runs 3] [--requests 64]
                                 [--new-tokens 128] [--device auto] [--dtype auto] [--quick]

Results go to benchmarks/results/serving.json for the default model and to
serving-<short name or directory name>.json for another base (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import torch

from benchmarks.common import RESULTS, Server, median, print_table, write_results
from clients.loadtest import LoadTestConfig, run_loadtest
from clients.workload import builtin_prompts
from server.model_store import DEFAULT_MODEL_ID, bundled_model, resolve_base_model
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    names = [f"adapter-{i}" for i in range(count)]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.mul_(0.05)  # non-zero, small enough to keep the text plausible
    model.save_pretrained(root, selected_adapters=names)
    # PEFT writes the first adapter at the root and the others in sub-folders.
    first = root / names[0]
    first.mkdir(exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if (root / f).exists():
            (root / f).rename(first / f)
    return names


def chat_ids(tokenizer, prompt) -> list[int]:
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def dtypes(model, lora: bool) -> list[str]:
    """The dtypes of a model's parameters: its LoRA weights, or all the others."""
    return sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()
                   if ("lora_" in n) == lora})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeftBaseline:
    """Tokens/s of PEFT's mixed-adapter generate on one static batch (loaded once)."""

    def __init__(self, model_dir: Path, root: Path, names: list[str], batch: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        base = hf_model(model_dir, device, dtype)
        # autocast_adapter_dtype=False: the LoRA weights in the base's dtype, not upcast
        # from bf16/fp16 to fp32 (the server's slot table is in the model's dtype).
        self.model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0],
                                               autocast_adapter_dtype=False)
        for name in names[1:]:
            self.model.load_adapter(root / name, adapter_name=name,
                                    autocast_adapter_dtype=False)
        self.model.to(device=device, dtype=dtype)
        self.device = device
        self.dtypes = {"base": dtypes(self.model, False), "lora": dtypes(self.model, True)}
        prompts = builtin_prompts()
        ids = [chat_ids(tok, prompts[i % len(prompts)]) for i in range(batch)]
        self.width = max(len(x) for x in ids)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.input_ids = torch.tensor([[self.pad] * (self.width - len(x)) + x for x in ids],
                                      device=device)
        self.mask = torch.tensor([[0] * (self.width - len(x)) + [1] * len(x) for x in ids],
                                 device=device)
        self.adapters = [names[i % len(names)] for i in range(batch)]

    def __call__(self, new_tokens: int) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=self.input_ids, attention_mask=self.mask,
                                      adapter_names=self.adapters, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.pad)
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        return (out.shape[1] - self.width) * len(self.adapters) / elapsed


class HFSingleStream:
    """HF `generate` for one stream, greedy, on the first built-in prompt; loaded once."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = hf_model(model_dir, device, dtype)
        self.device = device
        self.dtypes = dtypes(self.model, False)
        self.ids = torch.tensor([chat_ids(tok, builtin_prompts()[0])], device=device)
        self(4)  # warm-up

    def __call__(self, new_tokens: int) -> float:
        with torch.no_grad():
            synchronize(self.device)
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=self.ids, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
            synchronize(self.device)
        return (out.shape[1] - self.ids.shape[1]) / (time.perf_counter() - t0)


def load(target: str, adapters: tuple[str, ...], concurrency: int, requests: int,
         new_tokens: int):
    cfg = LoadTestConfig(target=target, concurrency=concurrency, duration_s=None,
                         num_requests=requests, adapters=adapters, distribution="round_robin",
                         max_new_tokens=new_tokens, ignore_eos=True, progress=False)
    result = run_loadtest(cfg)
    if result.requests_failed:
        raise RuntimeError(f"{result.requests_failed} requests failed: {result.errors_by_code}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default="default",
                   help="a bundled model's short name (gemma-3-270m) or a model directory; "
                        "the adapters are made for its shapes")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="requests per load run")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--single-pairs", type=int, default=3,
                   help="alternated (server, HF) single-stream measurements per run")
    p.add_argument("--device", default="auto",
                   help="the server's --device; the baselines run where the server does")
    p.add_argument("--dtype", default="auto",
                   help="the server's --dtype; the baselines run in the dtype it reports")
    p.add_argument("--quick", action="store_true", help="one run, fewer requests (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results/serving.json, or "
                        "serving-<model>.json for a base other than the default)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for switchboard serve (repeatable)")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.requests, a.new_tokens = 1, a.clients, 32
    bundled = bundled_model(a.base_model)
    model_dir = Path(resolve_base_model(a.base_model))
    if not model_dir.is_dir():
        p.error(f"--base-model {a.base_model!r}: a bundled model's short name or a model "
                "directory (the adapters are made from its weights)")
    model_name = bundled.model_id if bundled else model_dir.name
    if a.out is None and model_name != DEFAULT_MODEL_ID:
        a.out = RESULTS / f"serving-{model_name}.json"
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        names = make_adapters(model_dir, root, a.adapters, a.rank)
        server_args = ["--base-model", model_dir, "--adapter-dir", root,
                       "--max-batch-size", a.clients,
                       "--max-active-adapters", a.adapters, "--max-lora-rank", a.rank,
                       "--max-seq-len", 1024, "--kv-cache-memory", "2GiB",
                       "--device", a.device, "--dtype", a.dtype, *a.server_arg]
        with Server(server_args) as server:
            info = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.target)).GetModelInfo(
                pb.GetModelInfoRequest())
            device, dtype = torch.device(info.device), getattr(torch, info.dtype)
            hf = HFSingleStream(model_dir, device, dtype)
            peft = PeftBaseline(model_dir, root, names, a.clients, device, dtype)
            real = {"server_device": info.device, "server_dtype": info.dtype,
                    "server_quantization": info.quantization,
                    "peft_dtypes": peft.dtypes, "hf_dtypes": hf.dtypes}
            print(f"server on {info.device} in {info.dtype}; PEFT base {peft.dtypes['base']}, "
                  f"LoRA {peft.dtypes['lora']}; HF {hf.dtypes}", flush=True)
            # Warm-up: every adapter loaded on demand (from disk into a slot) and each
            # side's prompts seen once, so the runs measure the steady state, not the
            # first loads (a cold start is the loadtest's and the soak's concern)
            load(server.target, ("", *names), a.clients, 2 * (len(names) + 1), 4)
            for run in range(a.runs):
                # Each ratio's two sides run back to back (base, mixed, PEFT), the
                # baselines in this process while the server idles: this VM's speed
                # drifts by up to 2x over minutes.
                base = load(server.target, ("",), a.clients, a.requests, a.new_tokens)
                mixed = load(server.target, tuple(names), a.clients, a.requests, a.new_tokens)
                peft_tps = peft(a.new_tokens)
                pairs = [(load(server.target, ("",), 1, 1, a.new_tokens).output_tokens_per_s,
                          hf(a.new_tokens)) for _ in range(a.single_pairs)]
                runs.append({
                    "tokens_per_s": mixed.output_tokens_per_s,
                    "base_only_tokens_per_s": base.output_tokens_per_s,
                    "peft_tokens_per_s": peft_tps,
                    "single_stream_tokens_per_s": median([p[0] for p in pairs]),
                    "hf_single_stream_tokens_per_s": median([p[1] for p in pairs]),
                    "single_stream_ratio_vs_hf": median([p[0] / p[1] for p in pairs]),
                    "ttft_p50_s": mixed.ttft.p50, "ttft_p99_s": mixed.ttft.p99,
                    "itl_p50_s": mixed.itl.p50, "itl_p99_s": mixed.itl.p99,
                })
                print(f"run {run + 1}: server {mixed.output_tokens_per_s:.1f} tok/s with "
                      f"{a.adapters} adapters, {base.output_tokens_per_s:.1f} base only, PEFT "
                      f"{peft_tps:.1f}; single stream "
                      f"{runs[-1]['single_stream_tokens_per_s']:.1f} tok/s, HF "
                      f"{runs[-1]['hf_single_stream_tokens_per_s']:.1f}", flush=True)
    for run in runs:
        run["ratio_vs_peft"] = run["tokens_per_s"] / run["peft_tokens_per_s"]
        run["adapter_overhead_ratio"] = run["tokens_per_s"] / run["base_only_tokens_per_s"]
    summary = {key: median([r[key] for r in runs]) for key in runs[0]}
    rows = [(k, v) for k, v in summary.items()]
    print_table(f"serving {model_name} (median of {len(runs)} runs; {a.adapters} adapters "
                f"rank {a.rank}, {a.clients} clients, {a.new_tokens} new tokens)", rows)
    result = {**summary, **real, "runs": runs,
              "settings": vars(a) | {"out": a.out and str(a.out),
                                     "model": model_name, "model_dir": str(model_dir)}}
    path = write_results("serving", result, a.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
