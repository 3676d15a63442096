"""Quality beside speed: perplexity of each base variant on a fixed held-out text, and
teacher-forced next-token agreement with fp32 (issue 16).

The text is benchmarks/data/heldout.txt (an original essay written for this benchmark and
dedicated to the public domain, so no model was trained on it; about 2,500 SmolLM2 tokens).
Switchboard's logits come from the engine's own model (server.engine.loading.load_model with
the variant's dtype and --quantize, prefill through DecoderModel.forward), not from
transformers, so the figures are about the serving path. Perplexity is measured the way
llama.cpp's llama-perplexity does: the text cut into chunks of --ctx tokens, each scored on
its second half (every token there sees at least ctx/2 tokens of context), so the figures
stand beside llama.cpp's Q8_0/Q4_0 (and F32) on the same text, measured by llama-perplexity
itself when the peers build exists (benchmarks.llamacpp; `make bench-peers` makes it).
Agreement: the argmax of each position's logits over the first 512 predictions, against
fp32's (llama.cpp: its "Same top p" against its F32 logits, --kl-divergence).

Bars (issue 16): int8 perplexity within 1% of fp32, int4 within 8% (the same for w8a8 and
w4a8, whose activations are rounded to int8 as well).

    python -m benchmarks.quality [--variants fp32,bf16,int8,int4,w8a8,w4a8,nf4] [--ctx 512]
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
from pathlib import Path

import torch

from benchmarks.common import write_results

TEXT = Path(__file__).resolve().parent / "data" / "heldout.txt"
VARIANTS = {  # name -> (dtype, quantize)
    "fp32": (torch.float32, "none"),
    "bf16": (torch.bfloat16, "none"),
    "int8": (torch.float32, "int8"),
    "int4": (torch.float32, "int4"),
    "w8a8": (torch.float32, "w8a8"),  # activations rounded to int8 too (as llama.cpp's)
    "w4a8": (torch.float32, "w4a8"),
    "nf4": (torch.float32, "nf4"),
}
# perplexity within this fraction of fp32's (8-bit and 4-bit weights alike with 8-bit
# activations)
BARS = {"int8": 0.01, "int4": 0.08, "w8a8": 0.01, "w4a8": 0.08}


def chunk_logits(model, ids: list[int], dtype) -> torch.Tensor:
    """fp32 logits [n, vocab] of every position of one sequence, by one prefill step."""
    from server.engine.model import KVCache, StepInputs

    n = len(ids)
    device = model.embed.weight.device
    kv = KVCache(model.spec, rows=1, max_len=n, dtype=dtype, device=device)

    def long(values):
        return torch.tensor(list(values), dtype=torch.long, device=device)

    step = StepInputs(input_ids=long(ids), positions=long(range(n)), rows=long([0] * n),
                      decode_tok=long([]), decode_rows=long([]), decode_lens=long([]),
                      prefill=[(0, n, 0, 0)], sample_idx=long(range(n)))
    return model(step, kv, None).float()


def score(model, ids: list[int], ctx: int, dtype) -> dict:
    """llama-perplexity's measure: chunks of ctx tokens, each scored on its second half;
    plus the argmax of the first chunk's positions (for agreement)."""
    model.build_rope(ctx)
    nll, count, first_argmax = 0.0, 0, None
    for c in range(len(ids) // ctx):
        chunk = ids[c * ctx : (c + 1) * ctx]
        logits = chunk_logits(model, chunk, dtype)
        if first_argmax is None:
            first_argmax = logits.argmax(-1)
        half = ctx // 2  # as llama-perplexity: logits half..ctx-2 against the next tokens
        logp = torch.log_softmax(logits[half : ctx - 1], dim=-1)
        target = torch.tensor(chunk[half + 1 :], dtype=torch.long, device=logp.device)
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(target)
    return {"ppl": math.exp(nll / count), "scored_tokens": count, "argmax": first_argmax}


def llama_perplexity(ctx: int, fp32_ppl: float | None) -> dict:
    """llama.cpp's own measure on its GGUFs (F32, Q8_0, Q4_0) when the peers build exists."""
    from benchmarks import llamacpp

    exe = llamacpp.binary("llama-perplexity")
    models = {q: llamacpp.cache_root() / "models" / f"smollm2-135m-instruct-{q}.gguf"
              for q in llamacpp.QUANTS}
    if not exe.exists() or not all(p.exists() for p in models.values()):
        return {"skipped": "no llama.cpp build in the cache (make bench-peers builds it)"}
    out: dict = {}
    base = llamacpp.cache_root() / "f32-logits.kld"
    for q, path in models.items():
        cmd = [str(exe), "-m", str(path), "-f", str(TEXT), "-c", str(ctx), "-b", str(ctx)]
        # F32 saves its logits, the others compare against them (KL, same top token).
        cmd += (["--kl-divergence-base", str(base)] if q == "F32"
                else ["--kl-divergence-base", str(base), "--kl-divergence"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            out[q] = {"skipped": f"llama-perplexity exited {proc.returncode}: "
                                 + text.strip().splitlines()[-1][:300]}
            continue
        ppl = (re.search(r"Final estimate: PPL = ([\d.]+)", text)
               or re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text))
        row = {"ppl": float(ppl.group(1)) if ppl else None}
        same = re.search(r"Same top p:\s*([\d.]+)", text)
        if same:
            row["top1_agreement_with_F32"] = float(same.group(1)) / 100
        chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
        if chunks:
            row["chunks"] = int(chunks.group(1))
        out[q] = row
    if fp32_ppl and "ppl" in out.get("F32", {}) and out["F32"]["ppl"]:
        for q in llamacpp.QUANTS[1:]:
            if out.get(q, {}).get("ppl"):
                out[q]["ppl_vs_own_F32"] = out[q]["ppl"] / out["F32"]["ppl"] - 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="fp32,bf16,int8,int4,w8a8,w4a8,nf4")
    p.add_argument("--ctx", type=int, default=512, help="chunk length (llama-perplexity -c)")
    p.add_argument("--agreement-tokens", type=int, default=512)
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp's figures")
    p.add_argument("--device", default="cpu", help="where the engine's model runs (cpu, cuda)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"error: --variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if a.agreement_tokens > a.ctx:
        raise SystemExit(f"error: --agreement-tokens {a.agreement_tokens} exceeds --ctx "
                         f"{a.ctx}")
    from transformers import AutoTokenizer

    from server.engine.loading import ModelLoadError, load_model
    from server.model_store import provision_default_model

    model_dir = provision_default_model()
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT.read_text()).input_ids
    if len(ids) < 2 * a.ctx:
        raise SystemExit(f"error: {TEXT} has {len(ids)} tokens, fewer than 2 x --ctx")
    device = torch.device(a.device)
    rows: dict[str, dict] = {}
    ref = None
    for v in ["fp32"] + [v for v in variants if v != "fp32"]:
        dtype, quantize = VARIANTS[v]
        try:
            model = load_model(model_dir, dtype, device, quantize)
        except (ModelLoadError, ValueError, ImportError, RuntimeError) as e:
            rows[v] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{v}: skipped ({rows[v]['skipped']})", flush=True)
            continue
        s = score(model, ids, a.ctx, dtype)
        del model
        argmax = s.pop("argmax")[: a.agreement_tokens]
        if v == "fp32":
            ref = argmax
        rows[v] = {**s, "dtype": str(dtype).removeprefix("torch."), "quantize": quantize,
                   "top1_agreement_with_fp32": float((argmax == ref).float().mean())}
        print(f"{v}: ppl {s['ppl']:.3f}, agreement {rows[v]['top1_agreement_with_fp32']:.4f}",
              flush=True)
    fp32 = rows["fp32"]["ppl"]
    for v, row in rows.items():
        if "ppl" in row:
            row["ppl_vs_fp32"] = row["ppl"] / fp32 - 1
            if v in BARS:
                row["bar"] = BARS[v]
                row["meets_bar"] = row["ppl_vs_fp32"] <= BARS[v]
    llama = {"skipped": "--no-llama"} if a.no_llama else llama_perplexity(a.ctx, fp32)
    result = {"device": str(device), "text": "benchmarks/data/heldout.txt",
              "text_tokens": len(ids),
              "ctx": a.ctx, "agreement_tokens": a.agreement_tokens,
              "method": "chunks of ctx tokens scored on their second half (llama-perplexity's "
                        "measure); logits from server.engine.loading.load_model",
              "variants": rows, "llama_cpp": llama, "bars": BARS}
    path = write_results("quantization", result, a.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
