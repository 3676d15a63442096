"""Fixtures for the trainer tests: a tiny random Llama built offline (trainer_fixtures.py).

This directory has no __init__.py on purpose: as a package it would be importable as
`trainer` (tests/ is on sys.path) and shadow the real trainer package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_fixtures import build_tiny_base

# Other engineers share the CPU: one thread avoids oversubscription (10x faster here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def chat_file(tmp_path) -> Path:
    """A small JSONL data set in mixed shapes (32 usable rows)."""
    from trainer.tasks import task_split

    rows = []
    for i, r in enumerate(task_split("date_iso", "train", 36)):
        if i % 3 == 0:
            rows.append({"prompt": r["prompt"], "completion": r["completion"]})
        elif i % 3 == 1:
            rows.append({"instruction": r["prompt"], "input": "", "output": r["completion"]})
        else:
            rows.append({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["completion"]}]})
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
