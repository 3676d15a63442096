"""The pool of pre-faulted host buffers that adapter files are read into: a buffer is
reused only once nothing views it, spares are faulted in the background, small reads
bypass the pool, a spare serves requests up to twice smaller."""

from __future__ import annotations

import time

import torch

from server.adapters.buffers import HostBuffers

MB = 1 << 20


def _ptr(arr) -> int:
    return arr.__array_interface__["data"][0]


def _pooled(pool: HostBuffers) -> list[tuple[int, int]]:
    """(address, size) of the buffers waiting in the pool, once no spare is being made."""
    deadline = time.monotonic() + 30
    while pool._filling:
        assert time.monotonic() < deadline, "spares not made within 30 s"
        time.sleep(0.005)
    with pool._lock:
        return [(_ptr(b), b.size) for b in pool._free]


def test_a_buffer_comes_back_only_once_every_view_is_gone():
    pool = HostBuffers(spare=1, min_bytes=MB)
    first = pool.take(4 * MB)
    assert first.shape == (4 * MB,) and first.dtype.itemsize == 1
    address = _ptr(first)
    assert _pooled(pool) == []  # spares are made once the load is over...
    pool.refill()
    [(spare, size)] = _pooled(pool)  # ... one, faulted in the background
    assert size == 4 * MB and spare != address

    view = torch.frombuffer(first, dtype=torch.float32, count=16, offset=64)
    del first
    assert _pooled(pool) == [(spare, 4 * MB)]  # still read through `view`: not back
    view.fill_(7.0)
    del view  # now it is back; the pool keeps one buffer, the newest
    assert _pooled(pool) == [(address, 4 * MB)]
    pool.refill()  # the pool holds its one buffer: nothing to make
    assert _pooled(pool) == [(address, 4 * MB)]
    again = pool.take(4 * MB)
    assert _ptr(again) == address


def test_small_reads_bypass_the_pool_and_spares_fit_up_to_twice():
    pool = HostBuffers(spare=2, min_bytes=MB)
    small = pool.take(1000)  # block-aligned and padded to whole blocks, for O_DIRECT
    assert small.shape == (4096,) and _ptr(small) % 4096 == 0 and _pooled(pool) == []

    pool.refill()
    assert _pooled(pool) == []  # nothing taken from the pool yet: no size to make
    big = pool.take(3 * MB)
    pool.refill()
    spares = _pooled(pool)
    assert [size for _, size in spares] == [3 * MB, 3 * MB]
    two = pool.take(2 * MB)  # 2 MB <= 3 MB < 4 MB: a spare serves it
    assert two.shape == (2 * MB,) and _ptr(two) in [a for a, _ in spares]
    pool.refill()
    assert sorted(size for _, size in _pooled(pool)) == [2 * MB, 3 * MB]  # refilled
    one = pool.take(MB)  # every spare is at least twice too big: a fresh buffer
    assert one.shape == (MB,) and _ptr(one) not in [a for a, _ in spares]
    pool.refill()  # two waiting already
    assert sorted(size for _, size in _pooled(pool)) == [2 * MB, 3 * MB]
    odd = pool.take(MB + 1)
    assert odd.shape == (MB + 4096,) and _ptr(odd) % 4096 == 0
    del big
