"""The loop: resume, gradient accumulation, early stopping with best weights, NaN abort."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import base_overrides, same_adapter_tolerance

from trainer.checkpoint import list_checkpoints
from trainer.config import load_config
from trainer.monitor import read_metrics
from trainer.train import TrainingError, batch_indices, lr_at, train


def _weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, {"task": "date_iso", "learning_rate": 1e-3, "warmup_steps": 10,
                             "min_lr_ratio": 0.1})
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    const = load_config(None, {"task": "date_iso", "lr_scheduler": "constant", "warmup_steps": 0})
    assert {lr_at(s, 50, const) for s in range(50)} == {2e-4}


def test_batches_cover_each_epoch_once():
    seen = [i for s in range(4) for i in batch_indices(s, 32, 8, seed=3)]
    assert sorted(seen) == list(range(32))
    assert batch_indices(4, 32, 8, 3) != batch_indices(0, 32, 8, 3)  # reshuffled next epoch


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_resume_matches_uninterrupted_run(method, tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, method=method, max_steps=6, save_every=2,
                          eval_every=3, eval_generate_max=0)
    if method == "lora":
        over["lora_dropout"] = 0.1  # needs the RNG state restored to match
    cfg = load_config(None, over)
    train(cfg)
    out = tmp_path / "adapters" / "out"
    name = "adapter_model.safetensors"
    full = load_file(str(out / name))
    # interrupt after step 4: the step-6 checkpoint and the artifact never got written
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000006"]
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out)
    before = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train(load_config(None, {**over, "resume": True}))
    _assert_close(load_file(str(out / name)), full, atol=1e-6)
    # metrics.jsonl: the lines up to step 4 kept, steps 5 and 6 written again, once each
    after = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in after if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r for r in after if r["step"] <= 4] == [r for r in before if r["step"] <= 4]
    for a, b in zip(after[-3:], before[-3:], strict=True):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(
            b.get("loss", b.get("eval_loss")), rel=1e-4)


def test_gradient_accumulation_matches_large_batch(tiny_base, tmp_path):
    runs = {}
    lr, steps = 1e-2, 3
    for bs, acc in ((8, 1), (2, 4)):
        over = base_overrides(tiny_base, tmp_path / f"{bs}x{acc}", batch_size=bs, grad_accum=acc,
                              max_steps=steps, eval_generate_max=0, learning_rate=lr)
        train(load_config(None, over))
        runs[bs] = _weights(tmp_path / f"{bs}x{acc}" / "adapters" / "out")
    _assert_close(runs[8], runs[2], atol=same_adapter_tolerance(lr, steps))


def test_early_stopping_keeps_the_best_weights(tiny_base, tmp_path, monkeypatch):
    import trainer.train as tt

    real = tt.eval_loss
    scripted = iter([5.0, 1.0, 0.5, 0.7, 0.8, 0.9])  # before, then steps 1..5

    def fake(model, *a, **k):
        out = real(model, *a, **k)
        try:
            out["eval_loss"] = next(scripted)
        except StopIteration:
            pass
        return out

    monkeypatch.setattr(tt, "eval_loss", fake)
    over = base_overrides(tiny_base, tmp_path, max_steps=10, eval_every=1, save_every=1,
                          early_stopping_patience=2, eval_generate_max=0, learning_rate=1e-2,
                          save_total_limit=10)
    manifest = train(load_config(None, over))
    m = manifest["metrics"]
    assert m["stopped_early"] is True and m["steps"] == 4 and m["best_step"] == 2
    best = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" /
                         "trainable.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" /
                         "trainable.safetensors"))
    art = _weights(tmp_path / "adapters" / "out")
    key = next(k for k in best if "lora_A" in k)
    art_key = next(k for k in art if k.split("lora_A")[0].endswith(
        key.split("lora_A")[0].split("base_model.model.", 1)[1]) and "lora_A" in k)
    assert torch.equal(art[art_key], best[key]) and not torch.equal(art[art_key], last[key])


def test_nan_loss_aborts_with_a_clear_message(tiny_base, tmp_path, monkeypatch):
    import trainer.train as tt

    def nan_loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.sum() * float("nan"), 1

    monkeypatch.setattr(tt, "loss_sum", nan_loss)
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(learning rate"):
        train(load_config(None, base_overrides(tiny_base, tmp_path)))
    assert not (tmp_path / "adapters" / "out").exists()


def test_resume_refuses_a_different_run(tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, max_steps=2, eval_generate_max=0)
    train(load_config(None, over))
    with pytest.raises(TrainingError, match="cannot resume .* data_fingerprint"):
        train(load_config(None, {**over, "resume": True, "task": "bullet_list"}))
