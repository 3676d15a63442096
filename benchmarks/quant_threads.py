"""One stream of a quantized base: the kernels' small matmuls on one thread or on all.

The default model in an in-process Engine (fp32 activations, `--quantize` each of
--variants, fp32 as the control: BLAS, unaffected), one request at a time of
--new-tokens greedy tokens after a chat prompt, with `server.engine.quant.SMALL_MATMUL`
at 4 M multiply-adds (every one-row projection of the default model on one thread: the
setting before) and at its value now (they use every thread), alternating within each
round; tokens/s medians of --rounds and the per-round ratio's median.

    python -m benchmarks.quant_threads [--variants int8,int4,none] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import median, print_table, write_results
from benchmarks.profile_decode import _drive, _generate, engine_with_prompt
from server.engine import quant
from server.model_store import provision_default_model

ONE_THREAD = 1 << 22


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="int8,int4,none")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model_dir = provision_default_model()
    now = quant.SMALL_MATMUL
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for variant in a.variants.split(","):
            engine, ids = engine_with_prompt(model_dir, tmp, variant, 4, 256 << 20)

            def rounds(e=engine, i=ids) -> list[tuple[float, float]]:
                _generate(e, i, 8)  # warm-up
                out = []
                for _ in range(a.rounds):
                    tps = {}
                    for small in (ONE_THREAD, now):
                        quant.SMALL_MATMUL = small
                        tps[small] = 1 / _generate(e, i, a.new_tokens)
                    out.append((tps[ONE_THREAD], tps[now]))
                quant.SMALL_MATMUL = now
                return out

            runs = _drive(engine, rounds)
            results[variant] = {
                "one_thread_tokens_per_s": median([o for o, _ in runs]),
                "all_threads_tokens_per_s": median([n for _, n in runs]),
                "ratio_median_of_rounds": median([n / o for o, n in runs]),
                "rounds_tokens_per_s": runs}
            r = results[variant]
            print_table(f"one stream, --quantize {variant}", [
                ("one thread tok/s", r["one_thread_tokens_per_s"]),
                ("all threads tok/s", r["all_threads_tokens_per_s"]),
                ("ratio (median of rounds)", r["ratio_median_of_rounds"])])
            del engine
    path = write_results("quant-threads", {"small_matmul_now": now, "one_thread": ONE_THREAD,
                                           "variants": results,
                                           "settings": vars(a) | {"out": a.out and str(a.out)}},
                         a.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
