"""What CPU this process may use: its affinity, capped by a cgroup CPU quota.

A container with a CPU limit still sees every host core in `sched_getaffinity`, so an
engine that sized its thread pool from that would run more threads than the quota lets
it, and the kernel would throttle them in bursts (worse latency than fewer threads).
The quota is read from cgroup v2 (`cpu.max`: "QUOTA PERIOD" or "max PERIOD") or v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none) under `root`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup at `root` may use per period, or None for no limit
    (or no cgroup file to read)."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(root: Path = CGROUP_ROOT, affinity: int | None = None) -> int:
    """Threads worth running: the affinity, lowered to the quota (rounded down, at least
    one: 1.5 CPUs of quota run one busy thread without throttling, two would not)."""
    cpus = affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)
