"""The PyTorch engine: continuous batching over one resident base model with per-row
adapters. A single engine thread owns the model, the KV cache and the slot tables; other
threads only submit requests and read events."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from server import native
from server.adapters.lora import AdapterError
from server.adapters.registry import AdapterEntry, AdapterNotFoundError, AdapterRegistry
from server.adapters.slot_buckets import SlotBuckets, default_buckets
from server.config import EngineConfig
from server.engine.lifecycle import RequestLoop, RequestState, request_generator
from server.engine.loading import load_model
from server.engine.model import KVCache
from server.engine.ops import ModelOps
from server.engine.prefix_cache import PrefixCache
from server.engine.protocol import EngineInfo
from server.engine.step import pack_step
from server.engine.types import EngineError, ErrorEvent, GenerationRequest
from server.metrics import ServerMetrics
from server.model_store import model_fingerprint, stop_token_ids
from server.output_policy import OutputPolicies
from server.resources import available_memory, usable_cpus
from server.scheduler.scheduler import Entry, Scheduler, SchedulerConfig, Sequence, StepPlan

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """The CPUs this process may use: affinity capped by a cgroup CPU quota."""
    return usable_cpus()


def helper_thread_init() -> None:
    """For every thread but the engine's that runs torch ops (adapter loading, exports):
    one intra-op thread. The engine thread owns the cores; a second multi-threaded OpenMP
    team in the process (say, the main thread's after loading the model) cost the engine
    a third of its batch throughput on a 2-core machine (benchmarks/serving.py)."""
    torch.set_num_threads(1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# CPU flags (/proc/cpuinfo) of native bf16 matmuls: AVX-512 BF16 (Zen 4+, Cooper Lake+)
# and AMX (Sapphire Rapids+); elsewhere bf16 is emulated and slower than fp32
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device_type: str, flags: frozenset[str] | set[str]) -> torch.dtype:
    """`--dtype auto`: bf16 on CUDA and on CPUs with native bf16 (BF16_CPU_FLAGS among
    `flags`), fp32 elsewhere."""
    if device_type == "cuda" or (device_type == "cpu" and BF16_CPU_FLAGS & set(flags)):
        return torch.bfloat16
    return torch.float32


# --dtype and --adapter-dtype names
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_precision(name: str, device: torch.device, quantize: str = "none",
                   cpu_kernels: str = "auto") -> tuple[torch.dtype, str]:
    """(the activations' dtype, the weights' `--quantize` mode) for `--dtype name`.

    An explicit dtype is kept. auto: bf16 on CUDA; on a CPU, fp32 activations, and where
    auto_dtype finds native bf16 (avx512_bf16, AMX) and no `--quantize` is asked, bf16
    weights (`--quantize bf16`: half the bytes a decode step reads, the rest of the step in
    the fp32 C kernels; one stream 1.4x fp32's speed on a Zen 5, where bf16 activations
    through PyTorch's ops were 0.65x: docs/performance.md), fp32 weights where the kernels
    cannot build. With `--cpu-kernels torch` a bf16 CPU computes all in bf16 (PyTorch's
    ops, no C kernels)."""
    if name != "auto":
        try:
            return DTYPE_NAMES[name], quantize
        except KeyError:
            raise ValueError(f"dtype {name!r} is not one of auto, float32, bfloat16, "
                             "float16") from None
    if device.type != "cpu":
        return auto_dtype(device.type, frozenset()), quantize
    if auto_dtype("cpu", cpu_flags()) == torch.float32 or quantize != "none":
        return torch.float32, quantize
    if cpu_kernels == "torch":
        return torch.bfloat16, quantize
    try:
        native.kernels()  # bf16 weights without the kernels would be the slow path
    except native.NativeError:
        return torch.float32, quantize
    return torch.float32, "bf16"


def pick_adapter_dtype(name: str, dtype: torch.dtype, quantize: str, kernels: bool
                       ) -> torch.dtype:
    """The LoRA slot tables' dtype for `--adapter-dtype name` under activations of `dtype`
    over weights of `quantize` mode; kernels: the engine has the CPU kernels (the only path
    that takes bf16 tables under fp32 activations).

    auto: bf16 over bf16 weights (`--quantize bf16`: a decode step of adapters is bound by
    the bytes of slot table it streams, so fp32 tables over a 2.5x faster base cost the
    adapters' overhead ratio), else the activations' dtype. bf16 tables round the adapters'
    weights once (B with its scale folded in); the deltas are still summed in fp32."""
    if name == "auto":
        return torch.bfloat16 if quantize == "bf16" and kernels else dtype
    want = DTYPE_NAMES[name]
    if want == dtype:
        return want
    if want == torch.bfloat16 and dtype == torch.float32 and kernels:
        return want
    raise ValueError(f"--adapter-dtype {name} under {str(dtype).removeprefix('torch.')} "
                     "activations: the slot tables must be the activations' dtype, or bf16 "
                     "under float32 activations with the CPU kernels (--cpu-kernels auto or "
                     "native on a CPU)")


def prepack_auto(device: torch.device, dtype: torch.dtype, quantize: str, copy_bytes: int,
                 available: int | None) -> bool:
    """--prepack-weights auto: on the CPU, on for bf16 weights (their only fast GEMM), and
    for fp32 weights when oneDNN's second copy (`copy_bytes`) takes at most a quarter of the
    memory left (`available`, server.resources.available_memory; unknown: off): a 32-row
    step's projections 1.8x faster and its head 1.9x, the base alone with 32 clients served
    about 2x (docs/performance.md), for twice the weights' memory. Off for everything else
    (int8/int4/w8a8/w4a8 keep their own layouts, CUDA has no such copy)."""
    if device.type != "cpu":
        return False
    if quantize == "bf16":
        return True
    return (quantize == "none" and dtype == torch.float32 and available is not None
            and 4 * copy_bytes <= available)


class _State(RequestState):
    """A request's state in the PyTorch engine: its adapter and the slot it holds."""

    def __init__(self, req, handle, stream, generator, entry: AdapterEntry | None) -> None:
        super().__init__(req, handle, stream, generator)
        self.entry = entry
        self.slot: int | None = None
        self.prefix_written = False  # prefix adapters: keys/values placed in the KV cache
        self.share_checked = False  # req.prefill_from looked at
        self.copy_from: tuple[int, int] | None = None  # (row, tokens) to copy into our row
        # the prefix cache (server.engine.prefix_cache): the prompt's block names (None: not
        # looked up yet, or not cacheable), cached blocks to load into our row, and how many
        # of the prompt's blocks are in the cache or our row
        self.prefix_digests: list[bytes] | None = None
        self.prefix_blocks: list = []
        self.prefix_stored = 0
        self.waiting_for_slot = False


class Engine(RequestLoop):
    engine_path = "pytorch"

    def __init__(self, model_dir: Path | str, adapter_root: Path, config: EngineConfig, *,
                 metrics: ServerMetrics | None = None,
                 output_policies: OutputPolicies | None = None) -> None:
        """`metrics` and `output_policies`: the server's, handed in by server/app.py (and
        passed on to the registry); by default a private, unserved metrics set and no
        global policy, for tests and benchmarks that build an engine in process."""
        from transformers import AutoTokenizer

        self.config = config
        self.threads = config.threads or cpu_count()
        helper_thread_init()  # the caller (the main thread) loads the model on one thread
        self.device = pick_device(config.device)
        self.dtype, self.quantize = pick_precision(config.dtype, self.device, config.quantize,
                                                   config.cpu_kernels)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = load_model(model_dir, self.dtype, self.device, self.quantize)
        self.spec = self.model.spec
        self.max_seq_len = min(config.max_seq_len, self.spec.max_positions)
        self.model.build_rope(self.max_seq_len)
        per_row = KVCache.bytes_per_token(self.spec, self.dtype) * self.max_seq_len
        rows = min(config.max_batch_size, config.kv_cache_bytes // per_row)
        if rows < 1:
            raise ValueError(
                f"kv cache memory {config.kv_cache_bytes} bytes holds no row of "
                f"{self.max_seq_len} tokens ({per_row} bytes); raise --kv-cache-memory "
                "or lower --max-seq-len"
            )
        self.kv = KVCache(self.spec, rows, self.max_seq_len, self.dtype, self.device)
        # longrope: a prefix's keys depend on the sequence's length (prefix_cache's docstring)
        self.prefix_cache = PrefixCache(
            self.kv, 0 if self.spec.rope_long_from else config.prefix_cache_bytes,
            KVCache.bytes_per_token(self.spec, self.dtype))
        self.ops = ModelOps.pick(config.cpu_kernels, self.device, self.dtype)
        self.model.use_ops(self.ops)
        if self._prepack(config.prepack_weights):
            self.model.prepack()
        if self.ops.fused_decode and self.model.native_fallbacks():
            log.info("cpu kernels: decode steps run %s with PyTorch ops, the rest of the step "
                     "with the native kernels", " and ".join(self.model.native_fallbacks()))
        buckets = config.lora_slots or default_buckets(config.max_lora_rank,
                                                       config.max_active_adapters)
        self.adapter_dtype = pick_adapter_dtype(config.adapter_dtype, self.dtype, self.quantize,
                                                self.ops.kernels is not None)
        self.table = SlotBuckets(self.spec, buckets, config.max_active_adapters,
                                 self.adapter_dtype, self.device, self.ops.kernels)
        log.info("adapter slots: up to %d adapters on the device; LoRA slots by rank %s in %s "
                 "(%.0f MiB when every bucket is in use; a bucket is allocated on first use)",
                 config.max_active_adapters, self.table.describe(),
                 str(self.adapter_dtype).removeprefix("torch."),
                 self.table.capacity_bytes / (1 << 20))
        self.fingerprint = model_fingerprint(model_dir)
        if metrics is None:  # one private set, shared by the engine and its registry
            metrics = ServerMetrics(process_metrics=False)
        scheduler = Scheduler(SchedulerConfig(
            max_batch_size=rows,
            max_tokens_per_step=max(config.max_tokens_per_step, rows),
            max_queue=config.max_queue,
            kv_rows=rows,
        ))
        self.registry = AdapterRegistry(adapter_root, self.spec, self.table, self.fingerprint,
                                        allow_pickle=config.allow_pickle,
                                        host_bytes=config.max_host_adapter_bytes,
                                        dtype=self.dtype, device=self.device,
                                        on_ready=scheduler.has_work.set, metrics=metrics)
        super().__init__(self.tokenizer, set(), self.max_seq_len, scheduler,
                         thread_name="engine", metrics=metrics,
                         output_policies=output_policies)
        self.eos_ids = self._eos_ids()

    def _prepack(self, mode: str) -> bool:
        """--prepack-weights `mode`: on, off, or auto (`prepack_auto`, logged)."""
        if mode != "auto":
            return mode == "on"
        copy = self.model.plain_weight_bytes()
        left = available_memory()
        on = prepack_auto(self.device, self.dtype, self.quantize, copy, left)
        if self.device.type == "cpu" and self.quantize == "none" and self.dtype == torch.float32:
            log.info("prepack weights (auto): %s; oneDNN's copy of the projections and the "
                     "head is %.0f MiB, %s MiB of memory left", "on" if on else "off",
                     copy / (1 << 20), "unknown" if left is None else f"{left / (1 << 20):.0f}")
        return on

    # ---- the Engine protocol (server.engine.protocol), besides the lifecycle's ----------
    def info(self) -> EngineInfo:
        return EngineInfo(
            fingerprint=self.fingerprint, vocab_size=self.spec.vocab_size,
            max_seq_len=self.max_seq_len, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device), max_batch_size=self.kv.rows,
            max_active_adapters=self.table.max_active, max_lora_rank=self.table.max_rank,
            quantization=self.quantize)

    def memory(self) -> dict[str, int]:
        weights = sum(t.numel() * t.element_size()
                      for t in (*self.model.parameters(), *self.model.buffers()))
        weights += self.model.packed_nbytes
        return {"base_model": weights, "kv_cache": self.kv.nbytes,
                "prefix_cache": self.prefix_cache.nbytes,
                "adapter_slots": self.table.nbytes, "adapters_host": self.registry.host_usage()}

    # ---- the backend: adapters, the model, the KV cache -----------------------------
    def _new_state(self, req: GenerationRequest, cancel: Callable[[], None]) -> _State:
        entry = None
        if req.adapter_id:
            try:
                entry = self.registry.get(req.adapter_id)
            except AdapterNotFoundError as e:
                raise EngineError("NOT_FOUND", str(e)) from None
        handle = self._handle(req, entry.version if entry else "", cancel)
        state = _State(req, handle, self._stream(req), request_generator(req), entry)
        state.guard = self._guard(entry.policy if entry else None)
        return state

    def _thread_init(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)
        torch.ones(1 << 16).sum()  # binds this thread's OpenMP team to that count now

    def _can_admit(self, seq: Sequence) -> bool:
        return self._admit_adapter(seq) and self._share_prefill(seq) and self._reuse_prefix(seq)

    def _share_prefill(self, seq: Sequence) -> bool:
        """`req.prefill_from` names a request with the same prompt and adapter (a sibling
        choice of one HTTP request): once its prefill has passed our prompt but the last
        token, copy those keys and values into our row (in `_forward`) and compute only
        the last prompt token. Wait while it is queued or still in prefill; compute the
        whole prompt if it has gone or differs. Runs on the engine thread inside
        `schedule` (which holds the scheduler's lock)."""
        state: _State = seq.payload
        source = state.req.prefill_from
        if not source or state.share_checked or state.virtual:
            return True
        if any(s.request_id == source for s in self.scheduler.waiting):
            return False  # not admitted yet (or admitted in this very plan)
        n = len(seq.prompt_ids) - 1
        leader = next((s for s in self.scheduler.running if s.request_id == source), None)
        if leader is not None and leader.num_computed < n and leader.in_prefill:
            return False  # its prefill is under way
        state.share_checked = True
        if (leader is None or leader.row is None or n < 1 or leader.payload.virtual
                or leader.payload.entry is not state.entry or leader.num_computed < n
                or leader.prompt_ids[:n] != seq.prompt_ids[:n]):
            return True  # nothing to share: the whole prefill
        state.copy_from = (leader.row, n)
        seq.num_computed = n
        return True

    def _reuse_prefix(self, seq: Sequence) -> bool:
        """The longest cached prefix of the prompt under the request's adapter: its keys and
        values are copied into our row (in `_forward`) and only the rest is computed. Runs
        last in `_can_admit` (the request is admitted in this plan); once."""
        state: _State = seq.payload
        if state.prefix_digests is not None or not self.prefix_cache.enabled or state.virtual:
            return True
        root = "" if state.entry is None else f"{state.entry.adapter_id}\0{state.entry.version}"
        state.prefix_digests = self.prefix_cache.digests(root, seq.prompt_ids)
        if state.copy_from is not None:  # a sibling's prefill is copied instead
            state.cached_tokens = seq.num_computed
            return True
        blocks = self.prefix_cache.match(state.prefix_digests, len(seq.prompt_ids))
        state.prefix_blocks, state.prefix_stored = blocks, len(blocks)
        seq.num_computed = state.cached_tokens = len(blocks) * self.prefix_cache.block
        self.metrics.prefix_cache_lookup(len(seq.prompt_ids), state.cached_tokens)
        return True

    def _admit_adapter(self, seq: Sequence) -> bool:
        state: _State = seq.payload
        entry = state.entry
        if entry is None:
            return True
        if entry.retired and state.slot is None:
            # Replaced or unloaded before this request started: it is a new request for
            # the id, so it gets the current version (a retired one is never staged again).
            try:
                entry = state.entry = self.registry.get(entry.adapter_id)
            except AdapterNotFoundError:
                self._drop(seq, "NOT_FOUND", f"adapter {entry.adapter_id!r} was unloaded "
                           "before this request started")
                return False
            state.handle.adapter_version = entry.version
            state.guard = self._guard(entry.policy)  # and that version's output policy
        if entry.error is not None:
            self._drop(seq, "FAILED_PRECONDITION",
                       f"adapter {entry.adapter_id!r} failed to load: {entry.error}")
            return False
        if not self.registry.ensure_host(entry):
            return False  # loading off the step loop; the registry wakes us when done
        if state.slot is None:
            state.slot = self.registry.acquire(entry)  # pinned for this request
            state.waiting_for_slot = state.slot is None
            if state.slot is None:
                return False
        if entry.staging:
            return False  # its slot is being written off the step loop; we are woken
        virtual = entry.kind.virtual_tokens(entry.weights)
        if virtual:
            total = virtual + len(seq.prompt_ids) + state.req.stopping.max_new_tokens
            if total > self.max_seq_len:
                self._release(seq)
                self._drop(seq, "INVALID_ARGUMENT",
                           f"adapter {entry.adapter_id!r} adds {virtual} virtual tokens: "
                           f"prompt, virtual tokens and stopping.max_new_tokens make {total}, "
                           f"more than the context limit {self.max_seq_len}")
                return False
            state.virtual = virtual
            seq.prompt_ids = [0] * virtual + seq.prompt_ids
            if entry.kind.writes_prefix:
                seq.num_computed = virtual  # the prefix is written into the cache
        return True

    def _forward(self, plan: StepPlan) -> tuple[list[Entry], torch.Tensor, int]:
        for e in plan.entries:
            self._place_prefix(e.seq)
            self._copy_shared_prefill(e.seq)
            self._load_prefix(e.seq)
        packed = pack_step(plan.entries, self.table, self.device,
                           self.model.spec.rope_long_from)
        logits = self.model(packed.inputs, self.kv, packed.hooks)
        for e in plan.entries:
            self._store_prefix(e)
        return packed.sampled, logits, packed.num_tokens

    def _load_prefix(self, seq: Sequence) -> None:
        state: _State = seq.payload
        if state.prefix_blocks:
            self.prefix_cache.load(state.prefix_blocks, seq.row)
            state.prefix_blocks = []

    def _store_prefix(self, e: Entry) -> None:
        """The prompt's blocks this step completed, into the prefix cache."""
        state: _State = e.seq.payload
        if state.prefix_digests is None:
            return
        done = min(e.start + e.n, len(e.seq.prompt_ids)) // self.prefix_cache.block
        if done > state.prefix_stored:
            self.prefix_cache.store(state.prefix_digests[:done], state.prefix_stored, e.seq.row)
            state.prefix_stored = done

    def _copy_shared_prefill(self, seq: Sequence) -> None:
        """The keys and values of a shared prefill (`_share_prefill`): the source row is
        still running (rows are freed only after a step), its first n positions final."""
        state: _State = seq.payload
        if state.copy_from is None:
            return
        row, n = state.copy_from
        self.kv.write_prefix(seq.row, [k[row, :, :n] for k in self.kv.k],
                             [v[row, :, :n] for v in self.kv.v])
        state.copy_from = None

    def _place_prefix(self, seq: Sequence) -> None:
        """A kind that writes_prefix (prefix tuning): the adapter's keys and values go into
        the row's first cache positions once, before the row's first chunk runs."""
        state: _State = seq.payload
        if state.prefix_written or state.entry is None or not state.entry.kind.writes_prefix:
            return
        keys, values = state.entry.kind.prefix_kv(state.entry.device_weights)
        self.kv.write_prefix(seq.row, keys, values)  # state.virtual positions
        state.prefix_written = True

    def _deadline_error(self, seq: Sequence) -> ErrorEvent:
        if seq.payload.waiting_for_slot:
            return ErrorEvent(
                "RESOURCE_EXHAUSTED",
                "no adapter slot became free before the deadline: "
                + self.registry.slot_pressure(seq.payload.entry), cause="adapter_slots")
        return super()._deadline_error(seq)

    def _release(self, seq: Sequence) -> None:
        state: _State = seq.payload
        if state.entry is not None and state.slot is not None:
            self.registry.release(state.entry)
            state.slot = None

    def _kv_usage(self) -> tuple[float, float]:
        running = list(self.scheduler.running)
        tokens = sum(s.num_tokens for s in running)
        return len(running) / self.kv.rows, tokens / (self.kv.rows * self.kv.max_len)

    def _eos_ids(self) -> set[int]:
        return set(stop_token_ids(self.tokenizer, self.model_dir))


def load_engine_adapters(engine: Engine, preload: tuple[str, ...] = ()) -> list[str]:
    """Scan the adapter root at start; return the ids that failed to register or load."""
    try:
        return engine.registry.scan(preload)
    except AdapterError as e:
        log.error("adapter scan failed: %s", e)
        return []
