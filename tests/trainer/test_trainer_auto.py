"""`method: auto`: the choice from data size, memory and keep_base_quantized, and its reasons."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import base_overrides

from trainer.auto import (
    FULL_MIN_EXAMPLES,
    IA3_MAX_EXAMPLES,
    NoMethodFits,
    base_parameter_count,
    choose_method,
    needed_bytes,
)
from trainer.cli import main
from trainer.config import ConfigError, load_config
from trainer.train import train

P = 135_000_000  # SmolLM2-135M
GIB = 2**30


@pytest.mark.parametrize(("n", "memory", "quantized", "method", "why"), [
    (500, 64 * GIB, True, "qlora", "the base must stay 4-bit"),
    (FULL_MIN_EXAMPLES, 64 * GIB, False, "full", "full fine-tuning fits: train every weight"),
    (50_000, 2 * GIB, False, "lora", "but full fine-tuning does not fit"),
    (FULL_MIN_EXAMPLES - 1, 64 * GIB, False, "lora", "an adapter, not every weight"),
    (IA3_MAX_EXAMPLES - 1, 64 * GIB, False, "ia3", "fewest trainable parameters"),
    (IA3_MAX_EXAMPLES, 64 * GIB, False, "lora", "its float32 base fits"),
    (1000, int(needed_bytes("lora", P)) - 1, False, "qlora", "float32 base does not fit"),
    (1000, int(needed_bytes("lora", P)), False, "lora", "its float32 base fits"),
])
def test_choice(n, memory, quantized, method, why):
    choice = choose_method(n, P, memory, keep_base_quantized=quantized)
    assert choice.method == method
    assert choice.reasons[0].startswith(f"{n} training examples; base 135.0M parameters")
    assert any(why in r for r in choice.reasons[1:])


def test_nothing_fits():
    with pytest.raises(NoMethodFits, match="no method fits: base 135.0M parameters"):
        choose_method(1000, P, 10 * 2**20)
    with pytest.raises(NoMethodFits, match="keep_base_quantized needs qlora"):
        choose_method(1000, P, 10 * 2**20, keep_base_quantized=True)


def test_memory_estimates_order():
    # full needs 4x lora (weights, grads, two Adam moments), qlora about a sixth of lora
    assert needed_bytes("full", P) == 4 * needed_bytes("lora", P)
    assert needed_bytes("qlora", P) < needed_bytes("lora", P) / 6


def test_auto_keys_only_with_auto_or_qlora():
    with pytest.raises(ConfigError, match="memory_budget_mb applies to method auto, not lora"):
        load_config(None, {"task": "date_iso", "method": "lora", "memory_budget_mb": 100})
    with pytest.raises(ConfigError, match="keep_base_quantized applies to method auto/qlora"):
        load_config(None, {"task": "date_iso", "method": "ia3", "keep_base_quantized": True})
    # with auto, keys of any method may be given (used if that method is chosen)
    load_config(None, {"task": "date_iso", "method": "auto", "lora_r": 4, "memory_budget_mb": 9})


def test_dry_run_prints_the_choice(tiny_base, tmp_path, capsys):
    n_params = base_parameter_count(tiny_base)
    assert 50_000 < n_params < 500_000
    rc = main(["train", "task=date_iso", "task_train_size=40", f"base_model={tiny_base}",
               "method=auto", "lora_r=4", f"output_dir={tmp_path / 'out'}",
               f"run_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("method auto -> ia3:\n")
    assert f"40 training examples; base {n_params / 1e6:.1f}M parameters" in out
    assert "40 < 200 examples: ia3" in out and "not used by ia3: lora_r" in out
    assert "learning_rate 0.003 (the method's default)" in out
    assert '"method": "ia3"' in out


def test_auto_keeping_the_base_quantized_trains_qlora(tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, method="auto", keep_base_quantized=True,
                          max_steps=2, eval_generate_max=0, plot=False)
    manifest = train(load_config(None, over))
    assert manifest["training_method"] == "qlora"
    assert manifest["base_model"]["quantization"] == "nf4"
    assert manifest["method_choice"]["method"] == "qlora"
    assert "the base must stay 4-bit" in manifest["method_choice"]["reasons"][1]
    saved = json.loads((tmp_path / "adapters" / "out" / "switchboard.json").read_text())
    assert saved["trainer_config"]["method"] == "qlora"
