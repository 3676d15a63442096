"""FSDP (FSDP2 fully_shard) under `torchrun --nproc-per-node 2` on the CPU (gloo) against
one process with the same global batch: the same loss curve, each rank holding half."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import base_overrides, run_trainer, same_adapter_tolerance

from trainer.config import ConfigError, load_config
from trainer.monitor import read_metrics

# Both runs sum the same fp32 terms in another order (per rank, then across ranks), so
# each step's loss and gradient norm differ by rounding: a few fp32 ulps (1.2e-7) of the
# partial sums, carried through 3 Adam steps (the weights stay within
# same_adapter_tolerance). 1e-5 relative is about a hundred times what we measure (about
# 1e-7); a real difference (a rank's tokens weighted twice, the world factor missing in the
# loss scaling, a batch seen twice) moves the gradient norm by a factor or the loss of the
# next steps by more than 1e-3.
RTOL = 1e-5



@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_fsdp_two_processes_match_one(method, tiny_base, tmp_path):
    lr, steps = 1e-2, 3
    runs = {}
    for nproc, batch in ((1, 8), (2, 4)):
        over = base_overrides(tiny_base, tmp_path / f"p{nproc}", method=method,
                              batch_size=batch, max_steps=steps, log_every=1,
                              eval_every=steps, eval_generate_max=0, learning_rate=lr,
                              plot=False)
        args = [f"{k}={v}" for k, v in over.items()]
        if nproc == 1:
            cmd = [sys.executable, "-m", "trainer.cli", "train", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--standalone", "-m", "trainer.cli", "train", *args, "parallelism=fsdp"]
        run_trainer(cmd, tmp_path, 300)
        out = tmp_path / f"p{nproc}" / "adapters" / "out"
        runs[nproc] = {
            "metrics": json.loads((out / "switchboard.json").read_text())["metrics"],
            "steps": [r for r in read_metrics(tmp_path / f"p{nproc}" / "run" / "metrics.jsonl")
                      if r["kind"] == "train"],
            "weights": load_file(str(out / ("adapter_model.safetensors" if method == "lora"
                                            else "model.safetensors"))),
        }
    one, two = runs[1], runs[2]
    assert two["metrics"]["world_size"] == 2 and two["metrics"]["parallelism"] == "fsdp"
    # the base is sharded: each rank holds half of every parameter (first dimension even)
    per_rank, total = two["metrics"]["parameters_per_rank"], two["metrics"]["total_parameters"]
    assert len(per_rank) == 2 and sum(per_rank) == total
    assert all(abs(n / total - 0.5) < 0.02 for n in per_rank)
    # the same loss curve, step by step
    assert [r["step"] for r in two["steps"]] == [1, 2, 3]
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL)
        assert b["update_ratio"] == pytest.approx(a["update_ratio"], rel=1e-4)
    assert two["steps"][-1]["loss"] < two["steps"][0]["loss"]  # it learns
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=RTOL)
    # and the same weights in the artifact (gathered whole onto rank 0)
    assert one["weights"].keys() == two["weights"].keys()
    atol = same_adapter_tolerance(lr, steps)
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], atol=atol, rtol=0,
                                   msg=k)


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "ia3"}, "parallelism fsdp supports method full and lora, not ia3"),
    ({"resume": True}, "resume is not supported with parallelism fsdp"),
    ({"metric_for_best": "exact_match"}, "metric_for_best=exact_match is not supported"),
    ({"parallelism": "zero3"}, "parallelism: 'zero3' is not one of ddp, fsdp"),
])
def test_fsdp_config_refusals(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"task": "date_iso", "parallelism": "fsdp", **values})
