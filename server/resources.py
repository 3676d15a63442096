"""What CPU this process may use: its affinity, capped by a cgroup CPU quota; and how much
memory it may still take: the kernel's MemAvailable, capped by a cgroup memory limit.

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
MEMINFO = Path("/proc/meminfo")


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


def available_memory(root: Path = CGROUP_ROOT, meminfo: Path = MEMINFO) -> int | None:
    """Bytes this process could still allocate: /proc/meminfo's MemAvailable, lowered to
    what the cgroup's memory limit leaves (v2 memory.max - memory.current, v1
    memory.limit_in_bytes - memory.usage_in_bytes; no limit: "max", or v1's huge number);
    None when neither can be read."""
    left = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                left = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            if limit == "max":
                break
            cgroup_left = max(0, int(limit) - int((root / usage_file).read_text()))
        except (OSError, ValueError):
            continue
        left = cgroup_left if left is None else min(left, cgroup_left)
        break
    return left
