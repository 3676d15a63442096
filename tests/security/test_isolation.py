"""The per-row isolation helpers the engine calls (server/isolation.py)."""

from __future__ import annotations

import torch

from server.isolation import isolate, nonfinite_rows


def test_nonfinite_rows():
    logits = torch.zeros(4, 10)
    assert nonfinite_rows(logits) == []
    logits[1, 3] = float("nan")
    logits[3, 0] = float("inf")
    assert nonfinite_rows(logits) == [1, 3]
    logits[0, 2], logits[0, 5] = float("inf"), float("-inf")  # a NaN sum
    logits[2, 9] = float("-inf")
    assert nonfinite_rows(logits) == [0, 1, 2, 3]
    assert nonfinite_rows(logits.bfloat16()) == [0, 1, 2, 3]
    big = torch.full((2, 49152), 3e33)  # finite, large logits are not flagged
    assert nonfinite_rows(big) == []
    assert nonfinite_rows(torch.zeros(0, 10)) == []


def test_isolate_finds_exactly_the_failing_items():
    runs = []

    def run(part):
        runs.append(list(part))
        if any(x in (3, 6) for x in part):
            raise ValueError(f"poisoned {part}")

    ok, failed = isolate(list(range(8)), run)
    assert sorted(ok) == [0, 1, 2, 4, 5, 7]
    assert sorted(x for x, _ in failed) == [3, 6]
    assert all(isinstance(e, ValueError) for _, e in failed)
    ok, failed = isolate([1, 2], lambda part: None)
    assert ok == [1, 2] and failed == []
