"""Test helpers: tiny random models, PEFT adapters made on the spot, and real
server processes on loopback. Fixtures using them are in conftest.py."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Server

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_dir() -> Path:
    from server.model_store import provision_default_model

    return provision_default_model()


# Builds of the C kernels whose code paths the tests check: this CPU's (AVX-512 here), and
# on x86 also AVX2+FMA (x86-64-v3) and plain C (x86-64).
KERNEL_BUILDS = (["native", "x86-64-v3", "x86-64"] if platform.machine() == "x86_64"
                 else ["native"])


@functools.cache
def kernels_for(march: str):
    """server.native.Kernels built with -march=`march` (skips if this CPU cannot run it)."""
    import pytest

    from server import native

    if march == "native":
        return native.kernels()
    if march == "x86-64-v3":
        flags = Path("/proc/cpuinfo").read_text()
        if not all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
            pytest.skip("this CPU cannot run an x86-64-v3 build")
    return native.Kernels(native.build(Path(tempfile.mkdtemp(prefix="kernels-")), march))


def _tiny_spec():
    from server.engine.model import ModelSpec

    return ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=128, vocab_size=49152, rms_norm_eps=1e-5,
                     max_positions=1024, tie_word_embeddings=True, qkv_bias=False, o_bias=False,
                     mlp_bias=False)


TINY_SPEC = _tiny_spec()  # the shape of make_tiny_model()'s defaults


def make_tiny_model(out: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, seed: int = 0,
                    weight_scale: float = 4.0, max_positions: int = 1024,
                    tied: bool = True, model_type: str = "llama", random_norms: bool = False,
                    **config) -> Path:
    """A random model of `model_type` (transformers' name: llama, qwen2, qwen3, ...; more
    config fields in `config`) with the default model's tokenizer. Weights are scaled up
    from the usual init so that logits are peaked and greedy decoding is not a coin toss;
    biases are random (not zero); with random_norms so are the norms' weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = default_model_dir()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0, **config,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if random_norms:
                    p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
            else:
                p.mul_(weight_scale)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out


def make_lora(model_dir: Path, out: Path, *, r: int, targets: list[str], seed: int,
              alpha: float | None = None, rslora: bool = False) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                     init_lora_weights=False, use_rslora=rslora, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return out


def make_peft_adapter(model_dir: Path, out: Path, config, seed: int) -> Path:
    """A PEFT adapter of any `config` (IA3Config, PromptTuningConfig, ...) with random
    weights far enough from their identity init to change the output."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif p.requires_grad:
                p.mul_(3.0)
    model.save_pretrained(out)
    return out


def make_bottleneck(model_dir: Path, out: Path, seed: int) -> Path:
    """A bottleneck adapter (the trainer's format) with random weights far from zero."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.methods.bottleneck import BottleneckAdapters, config_for, save_bottleneck

    torch.manual_seed(seed)
    cfg = config_for(AutoModelForCausalLM.from_pretrained(model_dir), bottleneck_size=16,
                     activation="gelu")
    adapters = BottleneckAdapters(cfg)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_bottleneck(out, adapters)
    return out


class ServerProcess(Server):
    """`switchboard serve` on loopback for a test (benchmarks.common.Server). In float32
    unless the args name a dtype: the tests' references (transformers, PEFT) run in fp32,
    and `--dtype auto` would pick bf16 on a CPU with avx512_bf16 (test_dtype.py tests
    auto and bf16 serving)."""

    def __init__(self, args: list[str], *, timeout: float = 240.0) -> None:
        args = [str(a) for a in args]
        if "--dtype" not in args:
            args += ["--dtype", "float32"]
        super().__init__(args, timeout)


def http_call(server, path: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 60) -> tuple[int, dict, str]:
    """(status, headers, body text) of a plain HTTP call to the server's --http-port (a
    JSON body POSTed, else GET); an HTTP error status is returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout:.1f}s")


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` (with these label values) that the server
    at `port` exports now: what the server itself reports, not what a client infers."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class RegistryWaiter:
    """A registry's `on_ready` (AdapterRegistry(..., on_ready=RegistryWaiter())): called
    when a host load or a slot write ends, failed or not, it wakes `wait_on_registry`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, done, what: str, hang_guard: float) -> None:
        with self._cond:
            if not self._cond.wait_for(done, timeout=hang_guard):
                raise AssertionError(f"{what}: nothing after {hang_guard:.0f} s (loader hung)")


def wait_on_registry(reg, done, what: str, hang_guard: float = 600.0) -> None:
    """Block until done() holds, woken by the registry's `on_ready` (a RegistryWaiter,
    given to the registry when it was built), so the wait follows the loader threads
    however slow the machine; `hang_guard` only turns a hung loader into a failure."""
    assert isinstance(reg.on_ready, RegistryWaiter), "build it with on_ready=RegistryWaiter()"
    reg.on_ready.wait(done, what, hang_guard)
