"""Server configuration: parsed once from the command line into frozen dataclasses.

Nothing here imports torch or the engines: `switchboard serve --help` and a bad flag answer
at once, and the components take these dataclasses in their constructors.

Each setting is declared once, as a dataclass field whose metadata (`setting(...)`) holds
its flag: name (derived from the field's name unless given), help, parser, choices, the
values it accepts. `add_serve_arguments` generates the flags from the fields, in field
order, and `config_from_args` the dataclasses from the parsed flags; only the rules that
tie several fields together are written out there. The flags without a field are
`EXTRA_FLAGS`; tests/server/test_config.py checks fields and flags against each other."""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DRAIN_MARGIN_S = 5.0  # on top of the longest request: its last message and the goodbye

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'3GiB' -> 3221225472; plain numbers are bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MiB or 3GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_lora_slots(text: str) -> tuple[tuple[int, int], ...]:
    """'8:16,32:4' -> ((8, 16), (32, 4)); ranks distinct and ascending, counts >= 1."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(
                f"--lora-slots {text!r}: {part!r} is not RANK:SLOTS with both at least 1")
        out.append((int(m.group(1)), int(m.group(2))))
    ranks = [r for r, _ in out]
    if ranks != sorted(set(ranks)):
        raise argparse.ArgumentTypeError(
            f"--lora-slots {text!r}: ranks must be distinct and in ascending order")
    return tuple(out)


def parse_ids(text: str) -> tuple[str, ...]:
    """'a,,b' -> ('a', 'b'): a comma-separated list, empty items dropped."""
    return tuple(x for x in text.split(",") if x)


# -- how a field is declared --------------------------------------------------------------

_FLAG, _SECTION = "switchboard.flag", "switchboard.section"


@dataclass(frozen=True)
class Flag:
    """The command-line flag of one configuration field (its `dataclasses.field` metadata)."""

    help: str | None = None
    name: str | None = None  # None: "--" + the section's prefix + the field name, "_" -> "-"
    # None: from the annotation (int, float, Path; str as given; a bool is a store_true switch)
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    minimum: float | None = None  # smallest value accepted (None, a field's "unset", always is)
    valid: Callable[[Any], bool] | None = None  # any other test of the value alone
    invalid: str | None = None  # the error after the flag's name; default "must be at least N"
    before: str | None = None  # listed before this flag instead of at the field's place
    reads: str | None = None  # no flag of its own: the field takes the value of this flag


@dataclass(frozen=True)
class Section:
    """A field holding a nested configuration dataclass, whose fields have the flags."""

    cls: type
    prefix: str = ""  # of the derived flag names: "onnx-" makes OnnxConfig.variant --onnx-variant
    title: str | None = None  # the --help group of its flags; None = the parser's own


def setting(default: Any = MISSING, *, env: str | None = None, **flag: Any) -> Any:
    """A configuration field with its flag (keywords: `Flag`'s). env: an environment
    variable that, when set, replaces the default (read when the dataclass is created)."""
    if env is None:
        return field(default=default, metadata={_FLAG: Flag(**flag)})
    return field(default_factory=lambda: os.environ.get(env, default),
                 metadata={_FLAG: Flag(**flag)})


def section(cls: type, prefix: str = "", title: str | None = None) -> Any:
    """A field holding the nested configuration dataclass cls (see `Section`)."""
    return field(default_factory=cls, metadata={_SECTION: Section(cls, prefix, title)})


# -- the configuration ---------------------------------------------------------------------
# Field order is --help's order.


@dataclass(frozen=True)
class EngineConfig:
    max_host_adapter_bytes: int = setting(
        4 << 30, name="--max-host-adapter-memory", type=parse_size,
        help="host-memory budget for loaded adapters (LRU), e.g. 4GiB")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N")
    # auto: server.engine.engine.pick_precision
    dtype: str = setting(
        "auto", help="auto (bf16 on CUDA; on a CPU with avx512_bf16 or AMX, bf16 weights "
        "with fp32 activations, as --quantize bf16; fp32 elsewhere), float32, bfloat16, "
        "float16")
    # auto: server.engine.engine.pick_adapter_dtype
    adapter_dtype: str = setting(
        "auto", choices=("auto", "float32", "bfloat16"),
        help="the LoRA slot tables' dtype (activations and the adapters' sums stay in the "
        "activations' dtype). auto: bf16 where the base's weights are bf16 (what --dtype "
        "auto serves on a CPU with bf16: half the bytes a step of adapters streams), the "
        "activations' dtype elsewhere; float32 keeps adapters exact in fp32 over bf16 weights; "
        "bfloat16 under fp32 activations needs the CPU kernels; default %(default)s")
    # intra-op threads of the engine thread; 0: server.resources.usable_cpus
    threads: int = setting(
        0, minimum=0, invalid="must be 0 (every core) or more",
        help="CPU threads of the engine's matmuls (0 = the CPUs this process may use: its "
        "affinity, capped by a container's CPU limit; the process's other threads use one "
        "each)")
    max_batch_size: int = setting(32, minimum=1)
    max_tokens_per_step: int = setting(
        512, minimum=1, help="token budget of one engine step; long prefills are chunked to it")
    max_queue: int = setting(1024, minimum=1, help="waiting requests before RESOURCE_EXHAUSTED")
    max_seq_len: int = setting(
        2048, minimum=1, help="context length of one KV-cache row (prompt + generated tokens)")
    kv_cache_bytes: int = setting(
        3 << 30, name="--kv-cache-memory", type=parse_size,
        help="KV cache budget, e.g. 3GiB; rows = min(max batch, budget / row size)")
    max_active_adapters: int = setting(
        16, minimum=1,
        help="adapters on the device at once, any type and rank (default %(default)s)")
    max_lora_rank: int = setting(
        128, minimum=1, help="largest LoRA rank served (default %(default)s); slots come in "
        "rank buckets 8, 16, 32, ... up to it")
    # ((rank, slots), ...) ascending; empty: server.adapters.slot_buckets.default_buckets
    lora_slots: tuple[tuple[int, int], ...] = setting(
        (), type=parse_lora_slots, metavar="RANK:SLOTS,...",
        help="LoRA slots per rank bucket, e.g. 8:16,16:16,32:8,64:4,128:2 (an adapter takes a "
        "slot of the smallest bucket of at least its rank; a bucket's memory is allocated on "
        "first use). Default: buckets 8, 16, 32, ... up to --max-lora-rank with min(N, 16 N / "
        "rank) slots each, N = --max-active-adapters")
    # server.native.pick
    cpu_kernels: str = setting(
        "auto", env="SWITCHBOARD_CPU_KERNELS", choices=("auto", "native", "torch"),
        help="on the CPU in float32: C kernels built for this CPU on first start for "
        "decode-time LoRA and decode steps (native; needs a C compiler), PyTorch ops only "
        "(torch), or native when they build (auto); default %(default)s "
        "(SWITCHBOARD_CPU_KERNELS sets it)")
    prefix_cache_bytes: int = setting(
        256 << 20, name="--prefix-cache-memory", type=parse_size,
        help="memory for the keys and values of prompt prefixes reused across requests of "
        "the same adapter (automatic prefix caching, LRU; 0 = off), e.g. 256MiB; default "
        "256MiB")
    prepack_weights: str = setting(
        "auto", choices=("auto", "on", "off"),
        help="on the CPU, keep a second copy of the base model's projection weights in "
        "oneDNN's blocked layout for its GEMM (fp32 and bf16 weights: steps of 4 rows or "
        "more, bf16 weights under fp32 activations: 32 or more): 1.3-1.9x faster "
        "projections in a 32-row step, for twice the weights' memory; one stream keeps the "
        "C kernel on the plain weights. auto: on for bf16 weights (--quantize bf16, what "
        "--dtype auto serves on a CPU with bf16), and for fp32 weights when the copy takes "
        "at most a quarter of the memory left (MemAvailable, capped by a cgroup limit); "
        "default %(default)s")
    allow_pickle: bool = setting(False, help="allow adapter_model.bin (pickle) files")
    # none; int8, int4, bf16, w8a8, w4a8 (server.engine.quant); nf4 (bitsandbytes)
    quantize: str = setting("none", reads="--quantize")


@dataclass(frozen=True)
class Limits:
    """Request limits; each is reported with its value when a request exceeds it."""

    max_new_tokens: int = setting(
        1024, minimum=1, help="upper limit of stopping.max_new_tokens")
    default_max_new_tokens: int = setting(256, minimum=1)  # at most max_new_tokens
    max_stop_sequences: int = setting(8)
    max_stop_sequence_chars: int = setting(128, minimum=1)
    max_prompt_chars: int = setting(1 << 20, minimum=1)
    max_prompt_tokens: int = setting(
        0, minimum=0, help="prompt token limit; 0 = the context length only")
    max_response_format_chars: int = setting(
        32768, minimum=1, help="longest JSON schema or regular expression of structured output")
    max_message_bytes: int = setting(
        4 << 20, name="--max-message-size", type=parse_size, minimum=1024,
        invalid="must be at least 1KiB",
        help="largest gRPC message received or sent (default 4MiB)")
    max_concurrent_per_key: int = setting(  # a key's max_concurrent overrides it
        0, minimum=0, help="generation calls in flight per API key; 0 = no limit")
    retry_after_ms: int = setting(
        500, minimum=0,
        help="retry hint (trailing metadata retry-after-ms) on RESOURCE_EXHAUSTED")
    # The drain on shutdown and the connection-age grace follow from it.
    max_request_seconds: float = setting(
        300.0, name="--max-request-time", metavar="SECONDS", valid=lambda s: s > 0,
        invalid="must be more than 0",
        help="longest a generation may take, queue wait included (a request's deadline is "
        "capped to it; the default drain follows) (default %(default)s)")


@dataclass(frozen=True)
class SecurityConfig:
    """API keys, TLS and the bind policy; see docs/security.md."""

    api_keys: Path | None = setting(  # None = no authentication
        None, metavar="FILE",
        help="keys file (hashed keys, adapter patterns, admin flag); reloaded on change. "
        "Without it no key is asked and the server binds loopback only")
    allow_insecure_bind: bool = setting(
        False, help="without --api-keys, bind --host even if it is not loopback")
    output_policy: Path | None = setting(  # reloaded on SIGHUP
        None, metavar="FILE",
        help="global output policy (YAML: blocked terms, patterns, PII detectors; redact or "
        "stop), applied to every response before adapters' own rules; re-read on SIGHUP, a "
        "malformed file keeps the previous policy")
    tls_cert: Path | None = setting(None, metavar="PEM", help="server certificate chain (TLS)")
    tls_key: Path | None = setting(None, metavar="PEM", help="server key")
    tls_client_ca: Path | None = setting(  # set = mutual TLS
        None, metavar="PEM",
        help="CA for client certificates: mutual TLS, clients without one refused")


@dataclass(frozen=True)
class OnnxConfig:
    enabled: bool = setting(
        False, name="--onnx",
        help="serve adapters that have an ONNX export (trainer export-onnx) through ONNX "
        "Runtime")
    adapters: tuple[str, ...] = setting(  # empty = all
        (), type=parse_ids,
        help="comma-separated adapter ids allowed on the ONNX path (implies --onnx; default: "
        "every adapter with an export)")
    variant: str = setting(
        "auto", choices=("auto", "fp32", "int8", "int4"),
        help="which export to serve; auto prefers int8, then fp32, then int4")
    threads: int = setting(  # 0: server.resources.usable_cpus
        0, help="ONNX Runtime intra-op threads (0 = the CPUs this process may use, as "
        "--threads 0)")
    provider: str = setting(
        "auto", choices=("auto", "cpu", "cuda"),
        help="execution provider; auto = CUDA where onnxruntime-gpu has it")
    memory_bytes: int = setting(
        4 << 30, name="--onnx-memory", type=parse_size,
        help="host memory for ONNX sessions, e.g. 4GiB; idle ones are evicted (LRU)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", help="address to bind (default %(default)s)")
    port: int = setting(50051, help="gRPC port; 0 picks a free one (default %(default)s)")
    metrics_port: int = setting(  # -1 = no metrics endpoint
        9400, help="Prometheus /metrics port; 0 picks a free one, -1 disables (default "
        "%(default)s)")
    metrics_host: str | None = setting(  # None = same as host
        None, help="address of the /metrics endpoint (default: --host's)")
    http_port: int = setting(  # -1 = off, 0 = a free port
        -1, minimum=-1, invalid="must be -1 (off), 0 (a free port) or a port",
        help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health); 0 picks a free one, -1 (the default) serves none")
    http_host: str | None = setting(  # None = same as host
        None, help="address of the HTTP API (default: --host's)")
    base_model: str | None = setting(
        None, help="model directory or hub id (default: SmolLM2-135M-Instruct, provisioned "
        "from PyPI)")
    adapter_dir: Path = setting(
        Path("adapters"), help="adapter root, scanned at start (default %(default)s)")
    quantize: str = setting(  # EngineConfig.quantize reads it too
        "none", choices=("none", "int8", "int4", "bf16", "w8a8", "w4a8", "nf4"),
        help="base model weights: int8 (per channel), int4 (per group of 32) or bf16, "
        "weight-only (fp32 activations), with this project's CPU kernels (--dtype auto picks "
        "bf16 on a CPU with avx512_bf16 or AMX); w8a8 and w4a8: int8 or int4 weights with "
        "the activations rounded to int8 in blocks of 32 for the base matmuls (integer dot "
        "products, AVX-512 VNNI or AVX2, as llama.cpp's Q8_0 and Q4_0: faster "
        "and no longer exact on the dequantized weights); nf4 through bitsandbytes (what "
        "QLoRA trains against; fast on CUDA); adapters stay in full precision (default "
        "%(default)s)")
    preload: tuple[str, ...] = setting(
        (), type=parse_ids, help="comma-separated adapter ids to load into memory at start")
    watch_seconds: float = setting(
        0.0, name="--watch", metavar="SECONDS",
        help="poll the adapter root every SECONDS for added, changed or removed adapters "
        "(0 = off)")
    engine: EngineConfig = section(EngineConfig)
    limits: Limits = section(Limits)
    grpc_workers: int = setting(
        128, minimum=1, before="--max-request-time",
        help="threads serving gRPC calls (each open stream holds one)")
    grace_period: float | None = setting(  # None = limits.max_request_seconds + DRAIN_MARGIN_S
        None, minimum=0,
        help="seconds running requests get to finish after SIGTERM (default: "
        f"--max-request-time + {DRAIN_MARGIN_S:.0f})")
    max_connection_age: float = setting(  # seconds a client connection lives (0 = forever)
        300.0, minimum=0, invalid="must be 0 (never) or more", metavar="SECONDS",
        help="close client connections after this long (with the drain as grace for their "
        "calls), so clients reconnect and spread over new replicas; 0 = never (default "
        "%(default)s)")
    enable_admin: bool = setting(
        False, help="serve AdapterAdmin (off by default; with --api-keys only admin keys)")
    security: SecurityConfig = section(SecurityConfig, title="security (docs/security.md)")
    onnx: OnnxConfig = section(OnnxConfig, prefix="onnx-",
                               title="ONNX Runtime path (docs/onnx.md)")

    @property
    def drain_seconds(self) -> float:
        """How long running calls get to finish after SIGTERM: by default the longest a
        request may take, so a rollout never cuts a stream that is within its limit."""
        if self.grace_period is not None:
            return self.grace_period
        return self.limits.max_request_seconds + DRAIN_MARGIN_S


# -- flags generated from the fields -------------------------------------------------------

# Flags that set no field: (name, add_argument keywords)
EXTRA_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    # only to be refused together with --enable-admin (admin is off by default)
    ("--disable-admin", {"action": "store_true", "help": argparse.SUPPRESS}),
    ("--log-level", {"default": "INFO"}),  # read by server.cli
)


@dataclass(frozen=True)
class Setting:
    """One leaf field of ServerConfig with its flag, as the generated parser uses it."""

    path: tuple[str, ...]  # ("engine", "kv_cache_bytes")
    flag: Flag
    name: str  # the flag: --kv-cache-memory
    default: Any  # the dataclass's default, also the flag's
    type: Callable[[str], Any] | None  # None: the string as given, or a switch when is_switch
    is_switch: bool
    group: str | None  # the --help group's title

    @property
    def dest(self) -> str:
        """The namespace attribute, as argparse derives it from the flag."""
        return self.name.removeprefix("--").replace("-", "_")


def settings(cls: type = ServerConfig) -> list[Setting]:
    """Every leaf field of cls (ServerConfig's sections walked into), in --help's order."""
    out: list[Setting] = []
    _walk(cls, cls(), (), Section(cls), out)
    for s in [s for s in out if s.flag.before]:
        out.remove(s)
        at = [i for i, t in enumerate(out) if t.name == s.flag.before]
        if not at:
            raise TypeError(f"{'.'.join(s.path)}: before={s.flag.before!r}: no such flag")
        out.insert(at[0], s)
    return out


def _walk(cls: type, default: Any, path: tuple[str, ...], sec: Section,
          out: list[Setting]) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        value = getattr(default, f.name)
        if _SECTION in f.metadata:
            _walk(f.metadata[_SECTION].cls, value, (*path, f.name), f.metadata[_SECTION], out)
            continue
        if _FLAG not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no flag: declare it with setting()")
        flag: Flag = f.metadata[_FLAG]
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        parse = flag.type
        if parse is None and kind not in (str, bool) and flag.reads is None:
            if kind not in (int, float, Path):
                raise TypeError(f"{cls.__name__}.{f.name}: give the flag a type= for {kind}")
            parse = kind
        if kind is bool and value is not False:
            raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
        name = flag.reads or flag.name or f"--{sec.prefix}{f.name}".replace("_", "-")
        out.append(Setting((*path, f.name), flag, name, value, parse, kind is bool, sec.title))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in settings():
        if s.flag.reads:
            continue
        if s.group is None:
            target: argparse._ActionsContainer = p
        else:
            if s.group not in groups:
                groups[s.group] = p.add_argument_group(s.group)
            target = groups[s.group]
        kw: dict[str, Any] = {"dest": s.dest, "default": s.default, "help": s.flag.help}
        if s.is_switch:
            kw["action"] = "store_true"
        else:
            kw.update({k: v for k, v in (("type", s.type), ("choices", s.flag.choices),
                                         ("metavar", s.flag.metavar)) if v is not None})
        target.add_argument(s.name, **kw)
    for name, kw in EXTRA_FLAGS:
        p.add_argument(name, **kw)


def _build(cls: type, a: argparse.Namespace, by_path: dict[tuple[str, ...], Setting],
           path: tuple[str, ...] = ()) -> Any:
    kw = {}
    for f in fields(cls):
        if _SECTION in f.metadata:
            kw[f.name] = _build(f.metadata[_SECTION].cls, a, by_path, (*path, f.name))
        else:
            kw[f.name] = getattr(a, by_path[(*path, f.name)].dest)
    return cls(**kw)


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    every = settings()
    for s in every:
        value = getattr(a, s.dest)
        if value is None or s.flag.reads:
            continue
        if ((s.flag.minimum is not None and value < s.flag.minimum)
                or (s.flag.valid is not None and not s.flag.valid(value))):
            why = s.flag.invalid or f"must be at least {s.flag.minimum}"
            raise SystemExit(f"error: {s.name} {why}")
    c: ServerConfig = _build(ServerConfig, a, {s.path: s for s in every})
    # the rules between fields
    slots, rank = c.engine.lora_slots, c.engine.max_lora_rank
    if slots and slots[-1][0] > rank:
        raise SystemExit(f"error: --lora-slots has a bucket of rank {slots[-1][0]}, "
                         f"greater than --max-lora-rank {rank}")
    tls = c.security
    if (tls.tls_cert is None) != (tls.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if tls.tls_client_ca is not None and tls.tls_cert is None:
        raise SystemExit("error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if a.enable_admin and a.disable_admin:
        raise SystemExit("error: --enable-admin and --disable-admin contradict each other")
    limits = replace(c.limits, default_max_new_tokens=min(c.limits.default_max_new_tokens,
                                                          c.limits.max_new_tokens))
    onnx = replace(c.onnx, enabled=c.onnx.enabled or bool(c.onnx.adapters))  # implied
    return replace(c, limits=limits, onnx=onnx)
