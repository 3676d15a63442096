"""`make gpu-check`: what only a GPU can show, in one run of at most 10 minutes on one CUDA
card (never part of CI). Writes benchmarks/results/gpu.json with the card's name.

Steps, each a subprocess with its own time limit, in this order:
  1. parity-fp32, parity-bf16: tests/server/test_parity.py (greedy tokens and logprobs of the
     real server against PEFT, 8 adapters, alone and mixed) on CUDA in fp32 and in bf16
     (SWITCHBOARD_TEST_DEVICE / SWITCHBOARD_TEST_DTYPE);
  2. quantized: benchmarks.quality on CUDA, the base in fp32, bf16, int8, int4, w8a8, w4a8 and nf4
     (perplexity on the held-out text, top-1 agreement with fp32; bars: int8 within 1%,
     int4 within 8%);
  3. onnx-cuda: tests/onnx (not slow) with ONNX Runtime's CUDA execution provider, which
     their sessions pick by default (provider auto) once onnxruntime-gpu is installed
     (`pip install ".[cuda]"`); the step fails first if the provider is missing;
  4. serving: benchmarks.serving on CUDA (1 run: 2 runs did not end within 200 s on an
     H200), against PEFT and HF in the same run.

Without a CUDA device it stops at once with "no CUDA device" and exit status 2.

    python -m benchmarks.gpu_check [--budget 600] [--skip STEP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, write_results

ONNX_CUDA = """import sys, onnxruntime as ort, pytest
from server.onnx.session import pick_providers
print("providers:", pick_providers("auto"))
if pick_providers("auto")[0] != "CUDAExecutionProvider":
    sys.exit("onnxruntime has no CUDAExecutionProvider: pip install '.[cuda]'")
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "tests/onnx"]))
"""
NO_CUDA = "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing was run"


def steps(py: str) -> list[tuple[str, list[str], dict[str, str], int, Path | None]]:
    """(name, command, extra env, time limit in s, results file or None)."""
    pytest = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    return [
        ("parity-fp32", [*pytest, "tests/server/test_parity.py"],
         {"SWITCHBOARD_TEST_DEVICE": "cuda", "SWITCHBOARD_TEST_DTYPE": "float32"}, 120, None),
        ("parity-bf16", [*pytest, "tests/server/test_parity.py"],
         {"SWITCHBOARD_TEST_DEVICE": "cuda", "SWITCHBOARD_TEST_DTYPE": "bfloat16"}, 120, None),
        ("quantized", [py, "-m", "benchmarks.quality", "--device", "cuda", "--no-llama",
                       "--out", str(RESULTS / "gpu-quality.json")],
         {}, 90, RESULTS / "gpu-quality.json"),
        ("onnx-cuda", [py, "-c", ONNX_CUDA], {}, 120, None),
        ("serving", [py, "-m", "benchmarks.serving", "--device", "cuda", "--runs", "1",
                     "--out", str(RESULTS / "gpu-serving.json")],
         {}, 300, RESULTS / "gpu-serving.json"),
    ]


def cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=600, help="seconds for all steps together")
    p.add_argument("--skip", action="append", default=[], help="a step to leave out")
    a = p.parse_args(argv)
    card = cuda_name()
    if card is None:
        print(NO_CUDA, file=sys.stderr)
        return 2
    start = time.monotonic()
    rows: dict[str, dict] = {}
    for name, cmd, env, limit, out in steps(sys.executable):
        if name in a.skip:
            rows[name] = {"skipped": "--skip"}
            continue
        left = a.budget - (time.monotonic() - start)
        if left < 10:
            rows[name] = {"skipped": f"the {a.budget} s budget is spent"}
            continue
        print(f"gpu-check: {name}", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, text=True,
                                  capture_output=True, timeout=min(limit, left))
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e)[-2000:]
        row = {"ok": rc == 0, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
               "command": " ".join(cmd[1:]), "env": env, "output_tail": tail}
        if out is not None and rc == 0 and out.exists():
            row["results"] = json.loads(out.read_text())
        rows[name] = row
        print(f"  {'ok' if rc == 0 else 'FAILED'} ({row['seconds']} s)", flush=True)
    passed = all(r.get("ok") for r in rows.values() if "skipped" not in r)
    path = write_results("gpu", {"card": card, "passed": passed, "steps": rows,
                                 "seconds": round(time.monotonic() - start, 1)})
    print(f"wrote {path}; {'all steps passed' if passed else 'some steps FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
