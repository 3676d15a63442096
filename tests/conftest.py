"""Shared fixtures; the helpers behind them are in support.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ServerProcess, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def start_server():
    servers: list[ServerProcess] = []

    def start(*args: str, **kw) -> ServerProcess:
        s = ServerProcess([str(a) for a in args], **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
