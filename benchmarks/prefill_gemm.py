"""Prefill of a quantized base: the kernels alone against BLAS on dequantized weights.

The default model in an in-process Engine with `--quantize` each of --variants; a burst
of --requests chat prompts with one new token each (so the time is prefill: steps of up
to 512 prompt tokens) is timed with `server.engine.quant.GEMM_ROWS` at its value (chunks
of that many rows or more dequantize the weight and use BLAS) and at infinity (every
matmul through server/csrc/quant.c, as before), alternating within each round so that
both see the same machine; the ratio is taken per round, its median reported.

    python -m benchmarks.prefill_gemm [--variants int8,int4] [--requests 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import median, print_table, write_results
from benchmarks.profile_decode import _drive, engine_with_prompt
from server.engine import quant
from server.engine.engine import Engine
from server.engine.types import ErrorEvent, FinishEvent, GenerationRequest, StoppingParams
from server.model_store import provision_default_model


def _burst(engine: Engine, ids: list[int], requests: int) -> float:
    """Seconds from submitting `requests` one-token requests to the last one's finish."""
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"b{time.monotonic_ns()}-{r}", ids,
                                               stopping=StoppingParams(1, ignore_eos=True)))
               for r in range(requests)]
    for handle in handles:
        while True:
            ev = handle.events.get(timeout=600)
            if isinstance(ev, ErrorEvent):
                raise RuntimeError(ev.message)
            if isinstance(ev, FinishEvent):
                break
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="int8,int4")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model_dir = provision_default_model()
    gemm_rows = quant.GEMM_ROWS
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        for variant in a.variants.split(","):
            engine, ids = engine_with_prompt(model_dir, tmp, variant, a.requests, 512 << 20)
            tokens = a.requests * len(ids)

            def rounds(e=engine, i=ids) -> list[tuple[float, float]]:
                _burst(e, i, a.requests)  # warm-up
                out = []
                for _ in range(a.rounds):
                    times = {}
                    for rows in (gemm_rows, 1 << 30):
                        quant.GEMM_ROWS = rows
                        times[rows] = _burst(e, i, a.requests)
                    out.append((times[gemm_rows], times[1 << 30]))
                quant.GEMM_ROWS = gemm_rows
                return out

            runs = _drive(engine, rounds)
            with_gemm = median([g for g, _ in runs])
            kernels_only = median([k for _, k in runs])
            results[variant] = {
                "prompt_tokens": tokens,
                "prefill_tokens_per_s_gemm": tokens / with_gemm,
                "prefill_tokens_per_s_kernels_only": tokens / kernels_only,
                "speedup_median_of_rounds": median([k / g for g, k in runs]),
                "rounds_s": runs}
            print_table(f"prefill, --quantize {variant} ({tokens} prompt tokens)", [
                (f"GEMM_ROWS={gemm_rows} tok/s", results[variant]["prefill_tokens_per_s_gemm"]),
                ("kernels only tok/s", results[variant]["prefill_tokens_per_s_kernels_only"]),
                ("speedup (median of rounds)", results[variant]["speedup_median_of_rounds"])])
            del engine
    path = write_results("prefill-gemm", {"gemm_rows": gemm_rows, "variants": results,
                                          "settings": vars(a) | {"out": a.out and str(a.out)}},
                         a.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
