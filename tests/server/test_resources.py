"""usable_cpus: affinity capped by a cgroup CPU quota, read from a cgroup directory given
as a parameter (here temporary directories laid out like cgroup v1 and v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.resources import available_memory, cgroup_cpu_quota, usable_cpus


def v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text + "\n")
    return root


def v1(root: Path, quota: int, period: int = 100000) -> Path:
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("text,quota", [("200000 100000", 2.0), ("150000 100000", 1.5),
                                        ("50000 100000", 0.5), ("max 100000", None)])
def test_cgroup_v2_quota(tmp_path, text, quota):
    assert cgroup_cpu_quota(v2(tmp_path, text)) == quota


def test_cgroup_v1_quota(tmp_path):
    assert cgroup_cpu_quota(v1(tmp_path / "a", 300000)) == 3.0
    assert cgroup_cpu_quota(v1(tmp_path / "b", -1)) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    assert usable_cpus(tmp_path, affinity=16) == 16


@pytest.mark.parametrize("text,affinity,threads", [
    ("200000 100000", 16, 2),   # a 2-CPU container on a 16-core host: 2 threads, not 16
    ("150000 100000", 16, 1),   # 1.5 CPUs: one busy thread runs without throttling
    ("50000 100000", 16, 1),    # under one CPU: still one thread
    ("800000 100000", 4, 4),    # a quota above the affinity changes nothing
    ("max 100000", 8, 8),
])
def test_threads_follow_the_lower_of_affinity_and_quota(tmp_path, text, affinity, threads):
    assert usable_cpus(v2(tmp_path, text), affinity=affinity) == threads


def test_this_machine_gets_at_least_one_thread():
    assert usable_cpus() >= 1


def meminfo(path: Path, available_kib: int) -> Path:
    path.write_text(f"MemTotal:       24000000 kB\nMemFree:         1000000 kB\n"
                    f"MemAvailable:   {available_kib} kB\n")
    return path


def test_available_memory_is_memavailable_without_a_cgroup_limit(tmp_path):
    info = meminfo(tmp_path / "meminfo", 2_000_000)
    assert available_memory(tmp_path / "none", info) == 2_000_000 * 1024
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "memory.max").write_text("max\n")
    (tmp_path / "v2" / "memory.current").write_text("123\n")
    assert available_memory(tmp_path / "v2", info) == 2_000_000 * 1024
    assert available_memory(tmp_path, tmp_path / "no-meminfo") is None


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_available_memory_is_capped_by_what_the_cgroup_limit_leaves(tmp_path, layout):
    limit, used = 3 << 30, 1 << 30
    if layout == "v2":
        root = tmp_path
        (root / "memory.max").write_text(f"{limit}\n")
        (root / "memory.current").write_text(f"{used}\n")
    else:
        root = tmp_path
        (root / "memory").mkdir()
        (root / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (root / "memory" / "memory.usage_in_bytes").write_text(f"{used}\n")
    big, small = meminfo(tmp_path / "big", 20_000_000), meminfo(tmp_path / "small", 1_000_000)
    assert available_memory(root, big) == limit - used
    assert available_memory(root, small) == 1_000_000 * 1024  # the host's is lower
    (root / ("memory.current" if layout == "v2" else "memory/memory.usage_in_bytes")
     ).write_text(f"{limit + 5}\n")  # over its limit (reclaim pending): nothing left
    assert available_memory(root, big) == 0
