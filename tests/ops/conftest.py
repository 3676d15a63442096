"""Shared fixtures for the operations tests: repository paths and Prometheus binaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def require_binary(name: str) -> str:
    """Path of `name` on PATH, or skip: CI installs it with `apt-get install prometheus`."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"`{name}` not on PATH; install Debian's prometheus package "
            "(`apt-get install -y prometheus`, as .ci/run does) to run this test"
        )
    return path


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture
def prometheus_bin() -> str:
    return require_binary("prometheus")


def manifest_documents(directory: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) -> document of every YAML manifest in `directory` (not kustomization)."""
    import yaml

    docs = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs
