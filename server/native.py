"""The engine's C kernels for the CPU (csrc/), compiled on first use for this machine's CPU.

  * lora.c: decode-time LoRA, bound by reading the slot tables; it streams each slot's
    weights once per step with register-blocked FMAs, one call per projection group.
  * quant.c: weight-only int8 and int4 projections (server.engine.quant), fp32
    activations, the weights dequantized in registers; and fp32 and bf16 projections of
    few rows (server.engine.ops.native_linear).
  * qa8.c: int8 and int4 projections with the activations rounded to int8 a row
    (`--quantize w8a8|w4a8`), integer dot products (AVX-512 VNNI where the CPU has it).
  * decode.c: the non-matmul work of a step of decode tokens (norms, RoPE, cache write,
    attention over each row's own length, SiLU), one call each where PyTorch takes about
    28 small ops a layer; called through `DecodeOps`, which checks their operands.

They are built with the system C compiler (-march=native: AVX-512, AVX2 or plain C,
whatever the CPU has) into the cache (SWITCHBOARD_CACHE, default ~/.cache/switchboard)
under a name that hashes the sources, the flags, the compiler and the CPU, so a shared
cache never hands one CPU another's build. Without a compiler the engine logs why and
keeps the PyTorch ops, which compute the same (and are the reference in the tests).
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

import torch

log = logging.getLogger(__name__)

SOURCES_DIR = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(SOURCES_DIR.glob("*.c")))
HEADERS = tuple(sorted(SOURCES_DIR.glob("*.h")))  # in the build's hash, not compiled alone
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
# Segments longer than this (long prefill chunks) go to BLAS, which wins once there are
# enough rows to reuse each weight. Measured here (default model's shapes, rank 16, all
# 7 modules, 30 layers, 2 threads): 4 segments of 128 rows 48 ms native vs 69 ms BLAS;
# one segment of 256 rows 29 vs 25 ms.
MAX_ROWS = 128


class NativeError(Exception):
    """The kernels cannot be built or loaded here; the message says why in one line."""


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes)
    "lora_segments": (ctypes.c_int, [_P, _I, _P, _I, _I, _P, _P, _I, _I]),
    "lora_segments_bf16": (ctypes.c_int, [_P, _I, _P, _I, _I, _P, _P, _I, _I]),
    "rms_norm_rows": (None, [_P, _P, _P, _I, _I, _F]),
    "add_rms_norm_rows": (None, [_P, _P, _P, _P, _I, _I, _F]),
    "silu_mul_rows": (None, [_P, _P, _I, _I]),
    "decode_attention_rows": (ctypes.c_int, [_P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I,
                                             _I, _F, _P, _I]),
    "q8_matmul": (None, [_P, _I, _I, _P, _P, _P, _I, _I, _P, _I, _I]),
    "q4_matmul": (ctypes.c_int, [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I]),
    "q8a8_matmul": (ctypes.c_int, [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _I, _I]),
    "q4a8_matmul": (ctypes.c_int, [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _I, _I]),
    "qa8_path": (ctypes.c_int, []),
    "f32_matmul": (None, [_P, _I, _I, _P, _P, _I, _I, _P, _I, _I]),
    "bf16_matmul": (None, [_P, _I, _I, _P, _P, _I, _I, _P, _I, _I]),
}


class Kernels:
    """ctypes front of the library; one instance per process. Its functions take raw
    pointers: callers go through the checked fronts (`lora` here, `DecodeOps` for decode.c,
    server.engine.ops.native_linear and server.engine.quant for quant.c and qa8.c)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL calls release the GIL
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.path = path

    def lora(self, x: torch.Tensor, out: torch.Tensor, desc: int, segs: int, nsegs: int,
             threads: int, table_dtype: torch.dtype) -> None:
        """out[t, cols(m)] += x[t] @ A[slot] @ B_m[slot] for the segments' tokens; desc: the
        address of a `LoraSlotTable.native_desc` array (the table's own, kept alive by it),
        over slot tables of `table_dtype`; segs: the address of nsegs (slot, start, end)
        int64 triples, starts and ends within x's rows (`LoraHooks` keeps the array). x and
        out are CPU tensors with unit column stride, both fp32 or both bf16; fp32 tables
        take fp32 rows, bf16 tables either (widened in registers, the delta summed in fp32
        and added to a bf16 out once, as PEFT adds its bf16 delta). A decode step makes ~120
        of these calls: the checks are attribute comparisons only."""
        dtype = x.dtype
        if dtype is not out.dtype or x.stride(1) != 1 or out.stride(1) != 1 \
                or x.shape[0] != out.shape[0] or x.device.type != "cpu" \
                or not (dtype is torch.float32 or (dtype is torch.bfloat16
                                                   and table_dtype is torch.bfloat16)) \
                or table_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"lora kernel: x {x.dtype} and out {out.dtype} over {table_dtype} "
                             "tables: x and out must be CPU tensors of as many rows with unit "
                             "column stride, both float32 or both bfloat16; float32 tables "
                             "take float32 rows only")
        fn = self.lora_segments if table_dtype is torch.float32 else self.lora_segments_bf16
        if dtype is torch.float32:
            xf, y = x, out
        else:
            xf, y = x.float(), torch.zeros(out.shape, dtype=torch.float32)
        if fn(xf.data_ptr(), xf.stride(0), y.data_ptr(), y.stride(0), x.shape[0], desc,
              segs, nsegs, threads):
            raise MemoryError("lora kernel: no memory for its scratch")
        if y is not out:
            out += y


class DecodeOps:
    """decode.c's kernels (the work between a decode step's matmuls: norms, RoPE, cache
    write, attention, SiLU) for one model's shapes, their operands checked before the raw
    pointers go to C: float32 CPU tensors, contiguous, of the model's widths and of as many
    rows as each other. What stays the same from step to step (the norms' weights, the
    cache layers and RoPE tables) is checked once, when `weight` and `layer` hand out its
    pointers (`DecoderModel._decode_layers`); a step's own buffers once a step (`step`);
    each call the projection output it is handed, a few attribute comparisons. The values
    of the positions and cache rows are the engine's (below the cache's max_len and rows)
    and not read here. The tensors behind the pointers handed out are the caller's to keep
    alive (the model's parameters and KV cache)."""

    def __init__(self, kernels: Kernels, hidden: int, intermediate: int, heads: int,
                 kv_heads: int, head_dim: int, eps: float, scale: float) -> None:
        self.kernels = kernels
        self.hidden, self.intermediate, self.eps, self.scale = hidden, intermediate, eps, scale
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_width = (heads + 2 * kv_heads) * head_dim
        self.attn_width = heads * head_dim
        self.max_len = 0  # the cache layers' (`layer`)

    def weight(self, w: torch.Tensor | None) -> int:
        """The pointer of a norm's weight [hidden] (0 for None: no such norm)."""
        if w is None:
            return 0
        if w.dtype != torch.float32 or not w.is_cpu or not w.is_contiguous() \
                or w.shape != (self.hidden,):
            raise ValueError(f"decode kernels: norm weight {tuple(w.shape)} {w.dtype}, needs "
                             f"a contiguous float32 CPU tensor ({self.hidden},)")
        return w.data_ptr()

    def layer(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
              sin_rot: torch.Tensor) -> tuple[int, int, int, int]:
        """The pointers of a layer's cache k and v [rows, kv_heads, max_len, head_dim] and
        RoPE tables cos and sin_rot [>= max_len, head_dim]; every layer's cache of one
        max_len."""
        shape = k.shape
        if len(shape) != 4 or shape[1] != self.kv_heads or shape[3] != self.head_dim \
                or (self.max_len and shape[2] != self.max_len):
            raise ValueError(f"decode kernels: cache layer {tuple(shape)}, needs [rows, "
                             f"{self.kv_heads}, {self.max_len or 'max_len'}, {self.head_dim}]")
        self.max_len = shape[2]
        for name, t, want in (("k cache", k, shape), ("v cache", v, shape),
                              ("cos", cos, None), ("sin_rot", sin_rot, None)):
            if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() or (
                    t.shape != want if want is not None else (
                        t.dim() != 2 or t.shape[1] != self.head_dim
                        or t.shape[0] < self.max_len)):
                raise ValueError(f"decode kernels: {name} {tuple(t.shape)} {t.dtype}, needs a "
                                 "contiguous float32 CPU tensor of "
                                 + (f"{tuple(shape)}" if want is not None else
                                    f"[>= {self.max_len}, {self.head_dim}]"))
        return k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin_rot.data_ptr()

    def step(self, x: torch.Tensor, h: torch.Tensor, act: torch.Tensor, attn: torch.Tensor,
             pos: torch.Tensor, rows: torch.Tensor, threads: int) -> DecodeStep:
        """The kernels for one step of n decode tokens over its own buffers, checked here
        once: x (the residual stream) and h (the normed one) [n, hidden], act [n,
        intermediate], attn [n, heads * head_dim], pos and rows (each token's position and
        cache row) n int64."""
        n = x.shape[0]
        for name, t, shape, dtype in (
                ("x", x, (n, self.hidden), torch.float32),
                ("h", h, (n, self.hidden), torch.float32),
                ("act", act, (n, self.intermediate), torch.float32),
                ("attn", attn, (n, self.attn_width), torch.float32),
                ("positions", pos, (n,), torch.int64), ("rows", rows, (n,), torch.int64)):
            if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.shape != shape:
                raise ValueError(f"decode kernels: {name} {tuple(t.shape)} {t.dtype}, needs a "
                                 f"contiguous {str(dtype).removeprefix('torch.')} CPU tensor "
                                 f"{shape}")
        return DecodeStep(self, n, x, h, act, attn, pos, rows, threads)


class DecodeStep:
    """`DecodeOps` over one step's buffers (`DecodeOps.step`, checked there): each call
    checks only the tensor it is handed (a projection's output), then passes pointers."""

    def __init__(self, ops: DecodeOps, n: int, x: torch.Tensor, h: torch.Tensor,
                 act: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                 threads: int) -> None:
        self.ops, self.kernels, self.n, self.threads = ops, ops.kernels, n, threads
        self.x, self.h, self.act, self.attn = (x.data_ptr(), h.data_ptr(), act.data_ptr(),
                                               attn.data_ptr())
        self.pos, self.rows = pos.data_ptr(), rows.data_ptr()
        self.hidden_shape = (n, ops.hidden)
        self.qkv_shape = (n, ops.qkv_width)
        self.gu_shape = (n, 2 * ops.intermediate)

    def _ptr(self, name: str, t: torch.Tensor, shape: tuple[int, int]) -> int:
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() \
                or t.shape != shape:
            raise ValueError(f"decode kernels: {name} {tuple(t.shape)} {t.dtype}, needs a "
                             f"contiguous float32 CPU tensor {shape}")
        return t.data_ptr()

    def norm_input(self, w: int) -> None:
        """h = rms_norm(x) * weight (w from `DecodeOps.weight`)."""
        ops = self.ops
        self.kernels.rms_norm_rows(self.x, w, self.h, self.n, ops.hidden, ops.eps)

    def norm(self, t: torch.Tensor, w: int) -> None:
        """t = rms_norm(t) * weight in place, t [n, hidden] (the kernel reads, then
        writes)."""
        ops = self.ops
        p = self._ptr("norm input", t, self.hidden_shape)
        self.kernels.rms_norm_rows(p, w, p, self.n, ops.hidden, ops.eps)

    def add_norm(self, d: torch.Tensor, w: int) -> None:
        """x += d, then h = rms_norm(x) * weight: the residual add and the next norm."""
        ops = self.ops
        self.kernels.add_rms_norm_rows(self.x, self._ptr("residual", d, self.hidden_shape),
                                       w, self.h, self.n, ops.hidden, ops.eps)

    def silu_mul(self, gu: torch.Tensor) -> None:
        """act = silu(gate) * up, gu [n, 2 * intermediate] (gate, then up)."""
        self.kernels.silu_mul_rows(self._ptr("gate_up", gu, self.gu_shape), self.act, self.n,
                                   self.ops.intermediate)

    def attention(self, qkv: torch.Tensor, layer: tuple[int, int, int, int],
                  window: int) -> None:
        """RoPE on qkv's q and k (in place), k and v written at each token's position of
        its cache row, and attention over the row's positions (its last `window` with a
        window > 0) into attn; qkv [n, (heads + 2 kv_heads) head_dim], layer from
        `DecodeOps.layer`."""
        ops = self.ops
        k_p, v_p, cos_p, sin_p = layer
        if self.kernels.decode_attention_rows(
                self._ptr("qkv", qkv, self.qkv_shape), self.pos, self.rows, self.n, cos_p,
                sin_p, k_p, v_p, ops.heads, ops.kv_heads, ops.head_dim, ops.max_len, window,
                ops.scale, self.attn, self.threads):
            raise MemoryError("decode attention: head_dim over 512 or no memory")


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
        raise NativeError("no C compiler (cc, gcc or $CC) to build the CPU kernels")
    return cc


def build(cache: Path | None = None, march: str = "native") -> Path:
    """The kernels' shared library for this CPU, compiled unless already cached. `march`
    other than native builds for an older x86-64 level (the tests check every code path
    this way: x86-64-v3 is the AVX2 one, x86-64 the plain C one)."""
    from server.model_store import cache_dir

    if not SOURCES:
        raise NativeError(f"the kernels' C sources are missing from {SOURCES_DIR}")
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeError(f"C compiler {cc!r} does not run: {e}") from e
    flags = (*FLAGS, f"-march={march}")
    texts = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, *flags, *version, _cpu_signature()])
                         .encode()).hexdigest()[:16]
    name = f"switchboard_cpu-{key}.so"
    target = (cache or cache_dir()) / "kernels" / name
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    except OSError:  # a read-only cache: build into a private temporary directory
        target = Path(tempfile.mkdtemp(prefix="switchboard-kernels-")) / name
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise NativeError(f"{cc} could not build the CPU kernels: {detail}")
        os.replace(tmp, target)  # atomic: concurrent builders leave one whole file
    except subprocess.TimeoutExpired as e:
        raise NativeError(f"{cc} took over {e.timeout:.0f} s to build the CPU kernels") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def kernels() -> Kernels:
    """The process's kernels (built once); raises NativeError with the reason."""
    path = build()
    try:
        return Kernels(path)
    except (OSError, AttributeError) as e:
        raise NativeError(f"cannot load {path}: {e}") from e


def pick(mode: str, device: torch.device, dtype: torch.dtype) -> Kernels | None:
    """The kernels for `--cpu-kernels` mode (auto, native, torch), or None for PyTorch ops.
    auto: native on a CPU in fp32 when they build, else PyTorch ops (with a warning);
    native: the same but a failure is an error."""
    if mode == "torch":
        return None
    if mode not in ("auto", "native"):
        raise ValueError(f"cpu kernels {mode!r} (--cpu-kernels or SWITCHBOARD_CPU_KERNELS) is "
                         "not one of auto, native, torch")
    if device.type != "cpu" or dtype != torch.float32:
        if mode == "native":
            raise NativeError(f"the native kernels run on the CPU in float32, not "
                              f"{device.type} {str(dtype).removeprefix('torch.')}")
        return None
    try:
        return kernels()
    except NativeError as e:
        if mode == "native":
            raise
        log.warning("the engine uses PyTorch ops only: %s", e)
        return None


def pick_bf16(mode: str, device: torch.device, dtype: torch.dtype) -> Kernels | None:
    """The kernels for a bf16 model on a CPU with --cpu-kernels auto, or None: its few-row
    projections and output head (bf16_matmul) and its LoRA slot tables (the LoRA kernel
    reads bf16 tables); the rest of its step is PyTorch's."""
    if mode != "auto" or device.type != "cpu" or dtype != torch.bfloat16:
        return None
    try:
        return kernels()
    except NativeError as e:
        log.warning("the bf16 engine uses PyTorch ops only: %s", e)
        return None
