"""Fixtures for the ONNX path: a tiny model with well-conditioned weights (int8 keeps its
greedy tokens), a LoRA adapter on it, and its fp32 and int8 exports (made once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import make_lora, make_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("onnx-model"), weight_scale=2.0)


@pytest.fixture(scope="session")
def exported_root(tmp_path_factory, onnx_model) -> Path:
    """An adapter root: `hot` (LoRA with fp32 and int8 exports) and `cold` (no export)."""
    from trainer.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("onnx-adapters")
    make_lora(onnx_model, root / "hot", r=8, targets=TARGETS, seed=1)
    make_lora(onnx_model, root / "cold", r=4, targets=["q_proj", "v_proj"], seed=2)
    for quantize in ("none", "int8"):
        export_onnx(root / "hot", quantize=quantize)
    return root


@pytest.fixture
def adapter_copy(tmp_path, exported_root) -> Path:
    """A private copy of the exported `hot` adapter (tests may edit it)."""
    return Path(shutil.copytree(exported_root / "hot", tmp_path / "hot"))
