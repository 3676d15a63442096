"""The CPU LoRA kernel (csrc/lora_cpu.c), compiled on first use for this machine's CPU.

Decode-time LoRA is bound by reading the slot tables; the C kernel streams each slot's
weights once per step with register-blocked FMAs (AVX-512, AVX2 or plain C, whatever the
compiler finds with -march=native) in one call per projection group. It is built with
the system C compiler into the cache (SWITCHBOARD_CACHE, default ~/.cache/switchboard)
under a name that hashes the source, the flags, the compiler and the CPU, so a shared
cache never hands one CPU another's build. Without a compiler the engine logs why and
keeps the PyTorch ops (`server.adapters.slots`), which compute the same.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
# Segments longer than this (prefill chunks) go to BLAS, which wins once there are
# enough rows to reuse each weight (benchmarks/lora_kernel.py).
MAX_ROWS = 16


class NativeError(Exception):
    """The kernel cannot be built or loaded here; the message says why in one line."""


class LoraKernel:
    """ctypes front of `lora_segments`; one instance per process."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL calls release the GIL
        fn = lib.lora_segments
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int64]
        self._fn = fn
        self.path = path

    def __call__(self, x: torch.Tensor, out: torch.Tensor, desc: np.ndarray,
                 segs: np.ndarray, bits_ptr: int, threads: int) -> None:
        """out[t, cols(m)] += x[t] @ A[slot] @ B_m[slot] for the segments' tokens; x and out
        are fp32 CPU tensors with unit column stride; desc as `LoraSlotTable.native_desc`."""
        if x.stride(1) != 1 or out.stride(1) != 1 or x.dtype != torch.float32 \
                or out.dtype != torch.float32:
            raise ValueError("lora kernel: x and out must be float32 with unit column stride")
        if self._fn(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0],
                    desc.ctypes.data, segs.ctypes.data, len(segs), bits_ptr, threads):
            raise MemoryError("lora kernel: no memory for its scratch")


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines()
                     if line.startswith(("model name", "flags", "vendor_id")))


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeError("no C compiler (cc, gcc or $CC) to build the CPU LoRA kernel")
    return cc


def build(cache: Path | None = None) -> Path:
    """The kernel's shared library for this CPU, compiled unless already cached."""
    from server.model_store import cache_dir

    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeError(f"C compiler {cc!r} does not run: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *version,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    root = (cache or cache_dir()) / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache: build into a private temporary directory
        root = Path(tempfile.mkdtemp(prefix="switchboard-kernels-"))
    target = root / f"lora_cpu-{key}.so"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise NativeError(f"{cc} could not build the CPU LoRA kernel: {detail}")
        os.replace(tmp, target)  # atomic: concurrent builders leave one whole file
    except subprocess.TimeoutExpired as e:
        raise NativeError(f"{cc} took over {e.timeout:.0f} s to build the kernel") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def lora_kernel() -> LoraKernel:
    """The process's kernel (built once); raises NativeError with the reason."""
    path = build()
    try:
        return LoraKernel(path)
    except (OSError, AttributeError) as e:
        raise NativeError(f"cannot load {path}: {e}") from e


def pick(mode: str, device: torch.device, dtype: torch.dtype) -> LoraKernel | None:
    """The kernel for `--lora-kernel` mode (auto, native, torch), or None for PyTorch ops.
    auto: native on a CPU in fp32 when it builds, else PyTorch ops (with a warning);
    native: the same but a failure is an error."""
    if mode == "torch":
        return None
    if mode not in ("auto", "native"):
        raise ValueError(f"lora kernel {mode!r} is not one of auto, native, torch")
    if device.type != "cpu" or dtype != torch.float32:
        if mode == "native":
            raise NativeError(f"the native LoRA kernel runs on the CPU in float32, not "
                              f"{device.type} {str(dtype).removeprefix('torch.')}")
        return None
    try:
        return lora_kernel()
    except NativeError as e:
        if mode == "native":
            raise
        log.warning("LoRA uses PyTorch ops: %s", e)
        return None
