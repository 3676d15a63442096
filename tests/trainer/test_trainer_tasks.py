from __future__ import annotations

import json

import pytest

from trainer.tasks import SPLIT_SIZES, TASKS, task_split


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_are_deterministic_and_splits_disjoint(name):
    splits = {s: task_split(name, s) for s in SPLIT_SIZES}
    assert {s: len(v) for s, v in splits.items()} == SPLIT_SIZES
    assert task_split(name, "test") == splits["test"]
    prompts = [set(r["prompt"] for r in v) for v in splits.values()]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])
    assert not (prompts[1] & prompts[2])
    # a smaller train split is a prefix of the full one; test does not change
    assert task_split(name, "train", 50) == splits["train"][:50]


def test_json_extract_answers_are_json():
    for row in task_split("json_extract", "test")[:20]:
        obj = json.loads(row["completion"])
        assert set(obj) == {"name", "age", "city"} and obj["name"] in row["prompt"]


def test_unknown_task():
    with pytest.raises(KeyError, match="bundled tasks"):
        task_split("nope", "train")
