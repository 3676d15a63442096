"""End to end on the real Gemma 3 270M, small: `trainer train` (a few LoRA steps on
date_iso with `base_model: gemma-3-270m`), `trainer eval` of base and adapter, the server
started as a process serving the artifact, and its greedy answers over gRPC compared with
trainer eval's token for token (benchmarks/gemma_e2e.py, which runs the full-size version
and writes benchmarks/results/gemma_e2e.json)."""

from __future__ import annotations

import pytest

from benchmarks.gemma_e2e import main as gemma_e2e

pytestmark = pytest.mark.slow


def test_served_gemma_adapter_answers_equal_trainer_eval(tmp_path):
    res = gemma_e2e([
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "gemma_e2e.json"),
        "--limit", "8", "--max-new-tokens", "12",
        "--train-arg", "max_steps=4", "--train-arg", "batch_size=4",
        "--train-arg", "task_train_size=32", "--train-arg", "max_eval_examples=4",
        "--train-arg", "eval_every=4", "--train-arg", "save_every=4",
        "--train-arg", "plot=false", "--train-arg", "tensorboard=false"])
    # the answers are trained up to <end_of_turn> and both sides stop there (and at <eos>)
    assert res["stop_token_ids"] == [1, 106]
    assert res["prompts"] == 8 and res["compared"] == 16
    for side in ("base", "adapter"):
        cmp = res[side]["server"]
        assert cmp["differences"] == [], cmp["differences"]
        assert cmp["identical"] == 8
        assert cmp["server_exact_match"] == res[side]["exact_match"]
    # four steps moved the adapter: its loss on the task is below the base's
    assert res["adapter"]["eval_loss"] < 0.9 * res["base"]["eval_loss"]
