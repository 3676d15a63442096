"""Update magnitude (||update|| / ||weights||), metrics.jsonl and `trainer plot`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from trainer_fixtures import base_overrides

from trainer.cli import main
from trainer.config import load_config
from trainer.monitor import (
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    UpdateRatio,
    UpdateRatioWatch,
    module_group,
    read_metrics,
)
from trainer.train import train


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(3, 2, bias=False)
        self.mlp = nn.Linear(2, 2, bias=False)
        self.norm = nn.Linear(1, 1, bias=False)  # frozen below


def test_update_ratio_is_the_norm_of_the_step_over_the_weights():
    torch.manual_seed(0)
    block = nn.ModuleDict({"layer": _Block()})
    block["layer"].norm.weight.requires_grad_(False)
    attn, mlp = block["layer"].self_attn.weight, block["layer"].mlp.weight
    w_attn, w_mlp = attn.detach().clone(), mlp.detach().clone()
    u_attn, u_mlp = torch.full_like(attn, 0.01), torch.zeros_like(mlp)
    u_mlp[0, 0] = -0.5
    ratio = UpdateRatio(block)
    ratio.before()
    with torch.no_grad():
        attn += u_attn
        mlp += u_mlp
    r = ratio.after()
    assert set(r["update_ratio_by_group"]) == {"attn", "mlp"}  # the frozen norm is not counted
    # the steps actually taken (fp32 rounds +0.01), measured in float64
    attn, mlp = attn.detach().double(), mlp.detach().double()
    d_attn, d_mlp = (attn - w_attn.double()).norm(), (mlp - w_mlp.double()).norm()
    n_attn, n_mlp = w_attn.double().norm(), w_mlp.double().norm()
    assert float(d_attn) == pytest.approx(0.01 * 6 ** 0.5, rel=1e-5)
    assert r["update_ratio_by_group"]["attn"] == pytest.approx(float(d_attn / n_attn), rel=1e-12)
    assert r["update_ratio_by_group"]["mlp"] == pytest.approx(float(d_mlp / n_mlp), rel=1e-12)
    assert float(d_mlp) == pytest.approx(0.5, rel=1e-6)
    overall = (d_attn ** 2 + d_mlp ** 2) ** 0.5 / (n_attn ** 2 + n_mlp ** 2) ** 0.5
    assert r["update_ratio"] == pytest.approx(float(overall), rel=1e-12)


def test_zero_weights_give_no_ratio():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    ratio = UpdateRatio(lin)
    ratio.before()
    assert ratio.after() == {"update_ratio": None, "update_ratio_by_group": {"other": None}}


@pytest.mark.parametrize(("name", "group"), [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "attn"),
    ("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight", "mlp"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.embed_tokens.weight", "embed"),
    ("lm_head.weight", "lm_head"),
    ("prompt_encoder.default.embedding.weight", "prompt"),
    ("prompt_encoder.default.mlp_head.0.weight", "prompt"),
    ("bottleneck.layers.3.attn.down.weight", "attn"),
    ("bottleneck.layers.3.mlp.up.bias", "mlp"),
])
def test_module_groups(name, group):
    assert module_group(name) == group


def test_watch_warns_once_when_the_ratio_stays_outside():
    watch = UpdateRatioWatch(patience=3)
    low = UPDATE_RATIO_LOW / 10
    assert [watch.observe(s, low) is not None for s in (1, 2, 3, 4)] == [False, False, True,
                                                                         False]
    assert watch.observe(5, 1e-3) is None  # back in range: a new episode
    assert [watch.observe(s, 1.0) is not None for s in (6, 7, 8)] == [False, False, True]
    assert "above 0.1" in UpdateRatioWatch(patience=1).observe(9, UPDATE_RATIO_HIGH * 2)
    # a single excursion does not warn
    watch = UpdateRatioWatch(patience=3)
    assert all(watch.observe(s, v) is None for s, v in enumerate([1.0, 1e-3, 1.0, 1e-3]))


def test_run_writes_metrics_history_and_plot(tiny_base, tmp_path, caplog):
    over = base_overrides(tiny_base, tmp_path, method="lora", learning_rate=1e-2, max_steps=4,
                          log_every=2, eval_every=2, eval_generate_max=0, tensorboard=True)
    with caplog.at_level(logging.INFO, logger="trainer"):
        manifest = train(load_config(None, over))
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["learning_rate"] > 0 and r["grad_norm"] > 0 for r in steps)
    # the update ratio on logging steps only, overall and for attention and MLP (LoRA on both)
    assert [r["step"] for r in steps if "update_ratio" in r] == [2, 4]
    for r in steps[1::2]:
        assert 1e-4 < r["update_ratio"] < 1
        assert set(r["update_ratio_by_group"]) == {"attn", "mlp"}
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_loss"] > 0 for r in evals)
    history = json.loads((run / "history.json").read_text())
    assert [h["update_ratio"] for h in history if h["kind"] == "train"] == [
        r["update_ratio"] for r in steps[1::2]]
    assert manifest["metrics"]["update_ratio"] == steps[-1]["update_ratio"]
    line = next(m for m in caplog.messages if m.startswith("step 4/4"))
    assert "update_ratio" in line and "attn" in line and "mlp" in line
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard has the ratios too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/update_ratio", "train/update_ratio/attn", "train/update_ratio/mlp"} <= set(tags)
    assert [e.value for e in acc.Scalars("train/update_ratio")] == pytest.approx(
        [r["update_ratio"] for r in steps[1::2]], rel=1e-6)


@pytest.mark.parametrize(("lr", "words"), [(1e-9, "stayed below"), (0.9, "stayed above")])
def test_far_out_of_range_updates_warn(lr, words, tiny_base, tmp_path, caplog):
    over = base_overrides(tiny_base, tmp_path, method="lora", learning_rate=lr, max_steps=4,
                          log_every=1, eval_every=4, eval_generate_max=0, warmup_steps=0,
                          lr_scheduler="constant", max_grad_norm=0.0, plot=False)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, over))
    warnings = [r.message for r in caplog.records if "update ratio" in r.message]
    assert len(warnings) == 1 and words in warnings[0]


def test_a_normal_run_does_not_warn(tiny_base, tmp_path, caplog):
    over = base_overrides(tiny_base, tmp_path, method="lora", learning_rate=1e-3, max_steps=4,
                          log_every=1, eval_every=4, eval_generate_max=0, plot=False)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, over))
    assert not [r for r in caplog.records if "update ratio" in r.message]
    assert not (tmp_path / "run" / "metrics.png").exists()  # plot=false


def test_plot_cli(tiny_base, tmp_path, capsys):
    over = base_overrides(tiny_base, tmp_path, method="ia3", max_steps=3, log_every=1,
                          eval_generate_max=0, plot=False)
    train(load_config(None, over))
    out = tmp_path / "fig.png"
    assert main(["plot", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and str(out) in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_read_metrics_leaves_out_a_line_being_written(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "st')
    assert read_metrics(p) == [{"kind": "train", "step": 1, "loss": 2.0}]
