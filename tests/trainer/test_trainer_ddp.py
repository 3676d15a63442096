"""DDP: `torchrun --nproc-per-node 2` gives the same adapter as one process, same global batch."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import base_overrides, run_trainer, same_adapter_tolerance


@pytest.mark.parametrize("method", ["lora", pytest.param("adapter", marks=pytest.mark.slow)])
def test_two_processes_match_one(method, tiny_base, tmp_path):
    results = {}
    lr, steps = 1e-2, 3
    for nproc, batch in ((1, 8), (2, 4)):
        over = base_overrides(tiny_base, tmp_path / f"p{nproc}", method=method, batch_size=batch,
                              max_steps=steps, eval_generate_max=0, learning_rate=lr)
        args = [f"{k}={v}" for k, v in over.items()]
        if nproc == 1:
            cmd = [sys.executable, "-m", "trainer.cli", "train", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--standalone", "-m", "trainer.cli", "train", *args]
        run_trainer(cmd, tmp_path, 180)
        out = tmp_path / f"p{nproc}" / "adapters" / "out"
        results[nproc] = load_file(str(out / "adapter_model.safetensors"))
        metrics = __import__("json").loads((out / "switchboard.json").read_text())["metrics"]
        assert metrics["world_size"] == nproc
    assert results[1].keys() == results[2].keys()
    atol = same_adapter_tolerance(lr, steps)
    for k in results[1]:
        torch.testing.assert_close(results[2][k], results[1][k], atol=atol, rtol=0, msg=k)
