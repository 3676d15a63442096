"""`python -m benchmarks [NAME ...] [-- ARGS]`: run the benchmarks (all by default), each
printing its table and writing benchmarks/results/NAME.json."""

from __future__ import annotations

import importlib
import sys
import time

ALL = ("serving", "http", "kernels", "quant_kernels", "quantization_speed", "prefill_gemm",
       "quant_threads", "profile_decode", "bf16_adapters", "adapters", "slot_memory", "onnx",
       "trainer", "methods", "safety", "structured")


def main() -> int:
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(ALL)
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== benchmark {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.{name}").main([])
        except Exception as e:  # report and go on with the next benchmark
            print(f"benchmark {name} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t0:.0f}s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
