from __future__ import annotations

import pytest

from trainer.cli import main
from trainer.config import DEFAULT_LR, ConfigError, load_config


def test_defaults_and_method_learning_rates():
    cfg = load_config(None, {"task": "date_iso"})
    assert cfg.method == "lora" and cfg.lr == DEFAULT_LR["lora"] == 2e-4
    assert load_config(None, {"task": "date_iso", "method": "ia3"}).lr == 3e-3
    assert load_config(None, {"task": "date_iso", "method": "full"}).lr == 1e-5


def test_yaml_plus_typed_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: ia3\ntask: json_extract\nlearning_rate: 2e-3\nblocklist: [foo]\n")
    cfg = load_config(p, ["batch_size=2", "blocklist=a,b", "resume=true", "max_steps=7"])
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.blocklist) == ("ia3", 2e-3, 2, ("a", "b"))
    assert cfg.resume is True and cfg.max_steps == 7


@pytest.mark.parametrize(("values", "message"), [
    ({"task": "date_iso", "lora_rank": 4},
     "unknown config key(s): 'lora_rank' (did you mean 'lora_r'?)"),
    ({"task": "date_iso", "method": "ia3", "lora_r": 4},
     "lora_r applies to method lora/qlora, not ia3"),
    ({"task": "date_iso", "method": "lora", "num_virtual_tokens": 4}, "num_virtual_tokens applies"),
    ({"task": "date_iso", "method": "dora"}, "method: 'dora' is not one of"),
    ({}, "give exactly one of data"),
    ({"task": "date_iso", "data": "x.jsonl"}, "give exactly one of data"),
    ({"task": "nope"}, "task: 'nope' is not one of"),
    ({"task": "date_iso", "batch_size": 0}, "batch_size: must be > 0, got 0"),
    ({"task": "date_iso", "warmup_steps": 3, "warmup_ratio": 0.1}, "warmup_steps or warmup_ratio"),
    ({"data": "x.jsonl", "val_fraction": 0.0, "early_stopping_patience": 2},
     "early_stopping_patience needs evaluation data"),
    ({"task": "date_iso", "method": "prefix_tuning", "gradient_checkpointing": True},
     "gradient_checkpointing is not supported with method prefix_tuning"),
    ({"task": "date_iso", "method": "qlora", "precision": "fp16"}, "qlora with precision fp16"),
    ({"task": "date_iso", "metric_for_best": "exact_match", "eval_generate_max": 0},
     "needs eval_generate_max > 0"),
    ({"task": "date_iso", "lr_scheduler": "step"}, "lr_scheduler: 'step' is not one of"),
])
def test_invalid_configs_are_named(values, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, values)
    assert message in str(e.value)


@pytest.mark.parametrize(("override", "message"), [
    ("batch_size=two", "batch_size: expected an integer, got 'two'"),
    ("learning_rate=fast", "learning_rate: expected a number"),
    ("dedup=maybe", "dedup: expected true or false"),
    ("noequals", "is not of the form key=value"),
])
def test_bad_override_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["task=date_iso", override])


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"task": "date_iso", "batch_size": 0, "grad_accum": 0})
    assert "batch_size" in str(e.value) and "grad_accum" in str(e.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_cli_bad_config_exits_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import trainer.methods as methods

    monkeypatch.setattr(methods, "load_base", lambda *a, **k: pytest.fail("model loaded"))
    p = tmp_path / "c.yaml"
    p.write_text("task: date_iso\nmethod: ia3\nlora_alpha: 8\n")
    assert main(["train", "--config", str(p)]) == 2
    assert "lora_alpha applies to method lora/qlora, not ia3" in capsys.readouterr().err


def test_cli_dry_run(tiny_base, tmp_path, capsys):
    rc = main(["train", "task=date_iso", f"base_model={tiny_base}", "method=lora",
               f"output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert '"method": "lora"' in out and '"learning_rate": 0.0002' in out
    assert "trainable parameters:" in out
    assert "[[" in out and "<|im_end|>]]" in out  # EOS is trained
    assert not (tmp_path / "out").exists()


def test_bundled_example_configs_are_valid():
    from pathlib import Path

    import trainer

    configs = sorted((Path(trainer.__file__).parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)


def test_cli_dry_run_shows_chinese_text_intact(tiny_base, tmp_path, capsys):
    """The tiny byte-level BPE splits each Chinese character over several tokens; the
    preview decodes whole spans, so the prompt and answer read as written."""
    from trainer.tasks import task_split

    first = task_split("date_zh", "train", 32)
    rc = main(["train", "task=date_zh", "task_train_size=32", "val_fraction=0",
               f"base_model={tiny_base}", "method=lora", f"output_dir={tmp_path / 'out'}",
               f"run_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "\ufffd" not in out
    # the first example of the run (a seeded shuffle of the 32) appears whole, answer trained
    assert any(f"{r['prompt']}<|im_end|>" in out and f"[[{r['completion']}<|im_end|>]]" in out
               for r in first)
