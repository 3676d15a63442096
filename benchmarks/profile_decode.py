"""Where a decode step's time goes: the engine's decode loop, profiled in-process.

The default model in an in-process Engine (on the CPU: fp32 activations with
`--quantize` none, int8, int4 or bf16, or dtype-bf16: `--dtype bfloat16`; each of
--variants), one request at a time of --new-tokens greedy tokens after a short chat
prompt (`--rows N`: N such requests at once, decoding together as the 32-client serving
figures do, each step N rows). The engine's loop runs on this thread so that cProfile
sees it. Two passes per variant: unprofiled (wall time a decode step, from the moment
every request has its first token to the last token, median of --runs), then one more
pass under cProfile, whose time is split into:
  * matmuls: the layers' projections (server.engine.ops: Projection.forward's BLAS or
    native_linear's few-row kernel; QuantizedProjection.forward, server/csrc/quant.c)
    and the output head (DecoderModel._logits);
  * between the matmuls: the rest of `_forward_decode` (server/csrc/decode.c through ctypes:
    norms, RoPE, attention, SiLU) and its Python;
  * model, other: the embedding lookup and `forward`'s own work;
  * engine outside the model: step packing, sampling, stop checks, detokenizing, events,
    the scheduler.
cProfile's own overhead inflates the Python-heavy parts, so the shares are reported beside
the unprofiled time a step.

    python -m benchmarks.profile_decode [--variants none,int8,int4,bf16,dtype-bf16]
                                        [--new-tokens 128] [--rows 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.adapters import write_adapters
from benchmarks.common import median, print_table, write_results
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import ErrorEvent, FinishEvent, GenerationRequest, StoppingParams
from server.model_store import provision_default_model

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def engine_with_prompt(model_dir: Path, tmp: str, variant: str, max_batch_size: int,
                       kv_cache_bytes: int) -> tuple[Engine, list[int]]:
    """An in-process engine of `variant` (none, int8, int4, bf16: fp32 activations with
    that `--quantize`; dtype-bf16: `--dtype bfloat16`) and PROMPT's token ids."""
    dtype, quantize = (("bfloat16", "none") if variant == "dtype-bf16"
                       else ("float32", variant))
    engine = Engine(model_dir, Path(tmp), EngineConfig(
        dtype=dtype, quantize=quantize, max_batch_size=max_batch_size, max_seq_len=512,
        kv_cache_bytes=kv_cache_bytes))
    ids = engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                               tokenize=True)
    return engine, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _generate(engine: Engine, ids: list[int], new_tokens: int, rows: int = 1,
              adapters: list[str] = ()) -> float:
    """Seconds a decode step while `rows` requests decode together: from the moment every
    request has its first token (all prefills done) to the last finish, over the steps
    between. Request r names adapters[r % len(adapters)] when there are adapters."""
    tag = time.monotonic_ns()
    handles = [engine.submit(GenerationRequest(
        f"p{tag}-{r}", ids, adapter_id=adapters[r % len(adapters)] if adapters else "",
        stopping=StoppingParams(new_tokens, ignore_eos=True))) for r in range(rows)]
    first, last = [0.0] * rows, [0.0] * rows

    def collect(r: int) -> None:  # one reader a request: stamps when the events arrive
        stamps = []
        while True:
            ev = handles[r].events.get(timeout=600)
            stamps.append(time.perf_counter())
            if isinstance(ev, ErrorEvent):
                errors.append(ev.message)
                break
            if isinstance(ev, FinishEvent):
                break
        first[r], last[r] = stamps[0], stamps[-1]

    errors: list[str] = []
    readers = [threading.Thread(target=collect, args=(r,)) for r in range(rows)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return (max(last) - max(first)) / max(1, new_tokens - 1)


def _drive(engine: Engine, fn) -> None:
    """Run the engine's loop on this thread while `fn` runs on another, then stop it."""
    out: dict = {}

    def client() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # surfaced below
            out["error"] = e
        engine._stopping.set()
        engine.scheduler.has_work.set()

    engine._stopping.clear()
    t = threading.Thread(target=client)
    t.start()
    engine._loop()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _split(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of each part (see the module docstring) from a cProfile run."""
    cum: dict[str, float] = {}
    own: dict[str, float] = {}
    for (path, _, name), (_, _, tt, ct, _) in stats.stats.items():
        key = f"{Path(path).name}:{name}"
        cum[key] = cum.get(key, 0.0) + ct
        own[key] = own.get(key, 0.0) + tt
    loop, model = cum.get("lifecycle.py:_run", 0.0), cum.get("model.py:forward", 0.0)
    decode = cum.get("model.py:_forward_decode", 0.0)
    # BLAS (x @ W, addmm: the fp32 projections and the head) and the quantized kernel
    # and the fp32 few-row kernel (ctypes calls: their time is their callers' own);
    # Projection.forward and
    # DecoderModel.forward share a name, so the torch ops are counted, not the callers
    blas = sum(v for k, v in own.items()
               if "'__matmul__'" in k or "method addmm " in k or "method mm " in k)
    matmuls = blas + own.get("quant.py:_native", 0.0) + own.get("ops.py:native_linear", 0.0)
    return {"engine_step_s": loop, "model_forward_s": model, "matmuls_s": matmuls,
            "output_head_s": cum.get("model.py:_logits", 0.0),
            "between_matmuls_s": max(0.0, decode - matmuls),
            # LoraHooks.linear (server/adapters/slots.py): the adapters' deltas
            "adapters_s": cum.get("slots.py:linear", 0.0),
            "model_other_s": max(0.0, model - decode),
            "engine_outside_model_s": max(0.0, loop - model)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="none,int8,int4")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rows", type=int, default=1,
                   help="requests decoding together (1: one stream; 32: the 32-client batch)")
    p.add_argument("--adapters", type=int, default=0,
                   help="rank-16 all-projection LoRA adapters named round-robin by the rows")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model_dir = provision_default_model()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        adapters = write_adapters(model_dir, Path(tmp), a.adapters, 16) if a.adapters else []
        for variant in a.variants.split(","):
            engine, ids = engine_with_prompt(model_dir, tmp, variant, max(4, a.rows),
                                             (256 << 20) * max(1, a.rows // 4))
            for name in adapters:
                engine.registry.load(name)

            def run(e=engine, i=ids, n=a.new_tokens):
                return _generate(e, i, n, a.rows, adapters)
            _drive(engine, lambda e=engine, i=ids: _generate(e, i, 8, a.rows, adapters))  # warm-up
            per_token = _drive(engine, lambda: [run() for _ in range(a.runs)])
            prof = cProfile.Profile()
            prof.enable()
            _drive(engine, run)
            prof.disable()
            stats = pstats.Stats(prof)
            split = _split(stats)
            steps = a.new_tokens
            shares = {k.removesuffix("_s"): v / split["engine_step_s"]
                      for k, v in split.items() if k != "engine_step_s"}
            top = sorted(((f"{Path(f).name}:{n}", s[3]) for (f, _, n), s in stats.stats.items()),
                         key=lambda kv: -kv[1])[: a.top]
            results[variant] = {
                "rows": a.rows,
                "adapters": a.adapters,
                "ms_per_step": 1e3 * median(per_token),
                "tokens_per_s": a.rows / median(per_token),
                "profiled_ms_per_step": {k.removesuffix("_s"): 1e3 * v / steps
                                         for k, v in split.items()},
                "share_of_engine_step": shares,
                "top_cumulative_ms_per_step": {k: 1e3 * v / steps for k, v in top},
            }
            rows = [("unprofiled ms/step", results[variant]["ms_per_step"]),
                    ("unprofiled tok/s", results[variant]["tokens_per_s"])]
            rows += [(f"{k} ms/step (profiled)", v)
                     for k, v in results[variant]["profiled_ms_per_step"].items()]
            rows += [(f"{k} share", v) for k, v in shares.items()]
            print_table(f"{a.rows} row(s), {variant}", rows)
            del engine
    name = "profile-decode" if a.rows == 1 else f"profile-decode-{a.rows}rows"
    name += f"-{a.adapters}adapters" if a.adapters else ""
    path = write_results(name, {"variants": results,
                                            "settings": vars(a) | {"out": a.out and str(a.out)}},
                         a.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
