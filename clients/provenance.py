"""Where a measurement was made: the date, the command line, the commit and the CPU.

Every results JSON carries these (the load generator's and the benchmarks'), so a figure
can be traced to the code and the machine that produced it."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and its SIMD flags (what decides which kernels run)."""
    model, flags = "", []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(f for f in value.split()
                           if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni")))
    return {"cpu": model or platform.processor() or platform.machine(), "cpu_flags": flags}


def git_commit() -> str:
    """The commit of this checkout, with "-dirty" when tracked files had changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git_commit": git_commit(), "machine": {"python": platform.python_version(),
                                                    **cpu_info()}}
