"""Fixtures for the security tests: a tiny model's adapters and certificates."""

from __future__ import annotations

from pathlib import Path

import pytest
from security_support import Pki, make_pki
from support import make_lora


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def lora_source(tiny_model, tmp_path_factory) -> Path:
    """A few LoRA adapters for the tiny model, to copy into adapter roots."""
    root = tmp_path_factory.mktemp("lora-source")
    for i, name in enumerate(("tenant-a", "tenant-a-v2", "tenant-b", "shared")):
        make_lora(tiny_model, root / name, r=4, targets=["q_proj", "v_proj"], seed=10 + i)
    return root


def _bad_adapters(good: Path, root: Path) -> None:
    """Broken copies of a good adapter, each failing in its own way."""
    import shutil

    weights = (good / "adapter_model.safetensors").read_bytes()
    for name in ("corrupt", "truncated", "missing-weights", "bad-config", "empty-weights"):
        shutil.copytree(good, root / name)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(
        bytes((b * 31 + 7) % 256 for b in weights))
    (root / "truncated" / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "missing-weights" / "adapter_model.safetensors").unlink()
    (root / "bad-config" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    (root / "empty-weights" / "adapter_model.safetensors").write_bytes(b"")


@pytest.fixture(scope="session")
def fault_root(lora_source, tmp_path_factory) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("fault-adapters")
    for name in ("tenant-a", "shared"):
        shutil.copytree(lora_source / name, root / name)
    _bad_adapters(lora_source / "tenant-a", root)
    (root / "incoming").mkdir()
    return root


@pytest.fixture(scope="session")
def fault_server(tiny_model, fault_root):
    """No keys, admin on, two device slots; adapters good and broken. Shared by the fault
    and fuzz tests."""
    from support import ServerProcess

    s = ServerProcess(["--base-model", str(tiny_model), "--adapter-dir", str(fault_root),
                       "--max-seq-len", "256", "--kv-cache-memory", "8MiB",
                       "--max-new-tokens", "16", "--max-active-adapters", "2",
                       "--max-prompt-chars", "4000", "--enable-admin"])
    yield s
    s.stop()
