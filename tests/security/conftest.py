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
