"""Host buffers for adapter files, their pages faulted before a load needs them.

A cold load reads the adapter's file into one buffer whose tensors the host tier then
views (`read_safetensors`). Fresh memory is faulted in page by page by that read, and on
a VM whose guest memory is backed lazily a fault costs several microseconds: measured
on the 2-core benchmark VM, reading a 19.6 MB adapter from disk took 15-17 ms into
memory the process had touched before and 55-75 ms into fresh memory once the process
held 2 GB (a model server always does). So the pool keeps a few buffers ready:

  * spares, allocated and faulted on a background thread after a load is over;
  * buffers given back when the adapter that used them leaves host memory (evicted,
    replaced or unloaded): a `weakref.finalize` on the array handed out fires only once
    every tensor viewing it is gone, so a buffer is never reused while still read.

On CUDA this is where pinned host memory would be pooled too; the same rule applies.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ALIGN = 4096  # O_DIRECT reads need block-aligned addresses and lengths
Alloc = Callable[[int], np.ndarray]  # a block-aligned uint8 buffer for n bytes, padded


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def fresh(nbytes: int) -> np.ndarray:
    """An uninitialised buffer of `padded(nbytes)` bytes at a block-aligned address (a
    bytearray would be zero-filled: every page touched twice)."""
    raw = torch.empty(padded(nbytes) + ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % ALIGN
    return raw[start : start + padded(nbytes)].numpy()


class HostBuffers:
    """Buffers for at least `min_bytes` come from the pool: a pooled buffer serves a
    request of n bytes when it holds n to 2n bytes. At most `spare` buffers wait in it.
    Like `fresh`, `take` returns block-aligned buffers of `padded(n)` bytes."""

    def __init__(self, spare: int = 2, min_bytes: int = 1 << 20) -> None:
        self.spare = spare
        self.min_bytes = min_bytes
        self._free: list[np.ndarray] = []
        self._filling = 0
        self._size = 0  # of the last buffer taken from the pool
        self._lock = threading.RLock()  # finalizers may run inside a locked section
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefault")

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < self.min_bytes:
            return fresh(nbytes)
        n = padded(nbytes)
        with self._lock:
            fits = [b for b in self._free if n <= b.size < 2 * n]
            base = min(fits, key=lambda b: b.size) if fits else None
            if base is not None:
                self._free = [b for b in self._free if b is not base]
            self._size = nbytes
        if base is None:
            base = fresh(nbytes)
        out = base[:n]
        weakref.finalize(out, self._give_back, base)
        return out

    def refill(self) -> None:
        """Make spares, of the size last taken, up to `spare` waiting buffers. Called once
        a load is over: not racing its read, and after its evictions gave buffers back."""
        with self._lock:
            missing = max(0, self.spare - len(self._free) - self._filling) if self._size else 0
            self._filling += missing
        for _ in range(missing):
            self._filler.submit(self._fill, self._size)

    def _fill(self, nbytes: int) -> None:
        base = fresh(nbytes)
        base.fill(0)  # every page faulted here, off the load's path
        with self._lock:
            self._filling -= 1
            self._keep(base)

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            self._keep(base)

    def _keep(self, base: np.ndarray) -> None:
        self._free.append(base)
        if len(self._free) > self.spare:  # the oldest goes back to the allocator
            del self._free[0]
