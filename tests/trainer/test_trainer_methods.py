"""Every method trains a few steps, writes a complete artifact, and reloads to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import base_overrides
from transformers import AutoModelForCausalLM

from adapter_format.manifest import read_manifest
from trainer.config import METHODS, load_config
from trainer.data import collate, encode_example, normalize_record, pick_pad_id
from trainer.methods import bottleneck
from trainer.train import train

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _probe(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    rows = [{"prompt": "Rewrite this date in ISO 8601 format (YYYY-MM-DD): May 2, 1999",
             "completion": "1999-05-02"}, {"prompt": "List eggs", "completion": "- eggs"}]
    enc = [encode_example(tok, normalize_record(r)) for r in rows]
    batch = collate(enc, pick_pad_id(tok))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _independent_load(method, artifact, tiny_base):
    """Load like a third party would: PEFT for PEFT methods, our reference API for adapter."""
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(str(artifact)).eval()
    if method == "adapter":
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
        config, state = bottleneck.load_bottleneck(artifact)
        bottleneck.apply_bottleneck(model, config, state)
        return model.eval()
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32, **kwargs)
    return PeftModel.from_pretrained(base, str(artifact)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_reloads(method, tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, method=method)
    if method == "full":
        over["learning_rate"] = 1e-3  # visible change in 4 steps
    manifest = train(load_config(None, over))
    out = tmp_path / "adapters" / "out"
    files = {p.name for p in out.iterdir()}
    if method == "adapter":
        assert {"bottleneck_config.json", "adapter_model.safetensors"} <= files
    elif method == "full":
        assert {"model.safetensors", "config.json"} <= files
    else:
        assert PEFT_FILES <= files
    assert {"switchboard.json", "chat_template.jinja", "tokenizer.json",
            "data_report.json"} <= files
    # nothing half-written is left beside it
    assert [p.name for p in out.parent.iterdir()] == ["out"]

    m = read_manifest(out)
    assert m == json.loads((out / "switchboard.json").read_text())
    assert m["training_method"] == method
    assert m["method"] == {"qlora": "lora", "adapter": "bottleneck"}.get(method, method)
    assert m["base_model"]["fingerprint"] and m["base_model"]["path"] == str(tiny_base)
    assert m["trainer_config"]["method"] == method and m["data"]["fingerprint"]
    assert m["mergeable"] == (method in ("lora", "ia3")) and m["exports"] == {}
    assert m["pad_token_id"] != m["eos_token_id"]
    metrics = m["metrics"]
    assert metrics["reload_max_abs_diff"] <= metrics["reload_tolerance"] < 1e-3
    assert metrics["steps"] == 4
    for key in ("train_loss", "eval_loss", "eval_loss_before", "eval_perplexity",
                "exact_match", "bleu", "rouge_l", "tokens_per_s", "peak_memory_mb"):
        assert metrics[key] is not None, key
    assert manifest["metrics"] == metrics

    # the weights moved, and a fresh third-party load reproduces the trained model's logits
    probe = _probe(tiny_base)
    reloaded = _independent_load(method, out, tiny_base)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    with torch.no_grad():
        n = probe["input_ids"].shape[1]
        got = reloaded(**probe).logits[:, -n:]
        ref = base(**probe).logits
    assert (got - ref).abs().max() > 1e-6, "training changed nothing"
    assert metrics["eval_loss"] < metrics["eval_loss_before"] or method == "full"
    if method != "full":
        _server_reads(out, tiny_base, m["method"])


def _server_reads(artifact, tiny_base, served_method):
    """The server's adapter reader accepts what the trainer wrote (skipped until it exists)."""
    try:
        from server.adapters.kinds import read_adapter
        from server.engine.loading import spec_from_hf_config
    except ImportError:
        pytest.skip("server adapter reader not available")
    from transformers import AutoConfig

    spec = spec_from_hf_config(AutoConfig.from_pretrained(str(tiny_base)))
    method, weights = read_adapter(artifact, spec)
    assert method == served_method and weights.nbytes > 0


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_token_embeddings_are_saved(method, tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, method=method, num_virtual_tokens=5,
                          max_steps=2, eval_generate_max=0)
    manifest = train(load_config(None, over))
    loc = manifest["virtual_token_embeddings"]
    tensors = load_file(str(tmp_path / "adapters" / "out" / loc["file"]))
    assert tensors[loc["tensor"]].shape == (5, 64)


def test_prompt_tuning_is_initialised_from_text(tiny_base, tmp_path):
    from trainer.methods import build_trainable

    cfg = load_config(None, base_overrides(tiny_base, tmp_path, method="prompt_tuning",
                                           num_virtual_tokens=4, prompt_init_text="List eggs"))
    model = build_trainable(cfg, tiny_base)
    emb = model.prompt_encoder["default"].embedding.weight
    words = model.get_input_embeddings().weight
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_base))("List eggs")["input_ids"]
    ids = (ids * 4)[:4]
    assert torch.equal(emb, words[ids])


def test_failed_save_leaves_no_artifact(tiny_base, tmp_path, monkeypatch):
    import trainer.train as tt

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tt, "save_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        train(load_config(None, base_overrides(tiny_base, tmp_path, max_steps=1)))
    assert list((tmp_path / "adapters").iterdir()) == []


def test_retraining_replaces_the_artifact(tiny_base, tmp_path):
    over = base_overrides(tiny_base, tmp_path, max_steps=1, eval_generate_max=0)
    train(load_config(None, over))
    first = read_manifest(tmp_path / "adapters" / "out")["data"]["fingerprint"]
    train(load_config(None, {**over, "task": "bullet_list"}))
    second = read_manifest(tmp_path / "adapters" / "out")
    assert second["data"]["source"] == "task:bullet_list" and second["data"]["fingerprint"] != first
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["out"]


def test_jsonl_data_file_and_report(tiny_base, tmp_path, chat_file):
    with chat_file.open("a") as f:
        f.write(json.dumps({"prompt": "x", "completion": ""}) + "\n")
    over = base_overrides(tiny_base, tmp_path, max_steps=1, eval_generate_max=0)
    del over["task"], over["task_train_size"], over["max_eval_examples"]
    over.update(data=str(chat_file), val_fraction=0.25)
    manifest = train(load_config(None, over))
    assert manifest["data"]["train_examples"] + manifest["data"]["validation_examples"] == 36
    report = json.loads((tmp_path / "adapters" / "out" / "data_report.json").read_text())
    assert report["dropped"] == {"empty": 1} and report["dropped_examples"][0]["line"] == 37


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning",
                                    "adapter"])
def test_loss_on_kept_columns_equals_full_cross_entropy(method, tiny_base, tmp_path):
    from trainer.data import IGNORE
    from trainer.evaluate import loss_sum
    from trainer.methods import build_trainable

    cfg = load_config(None, base_overrides(tiny_base, tmp_path, method=method))
    torch.manual_seed(0)
    model = build_trainable(cfg, tiny_base).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    enc = [encode_example(tok, normalize_record({"prompt": "Hi there", "completion": c}))
           for c in ("1999-05-02", "- eggs\n- milk")]
    batch = collate(enc, pick_pad_id(tok))
    with torch.no_grad():
        got, n = loss_sum(model, batch)
        logits = model(**{"input_ids": batch["input_ids"],
                       "attention_mask": batch["attention_mask"]}).logits
        logits = logits[:, -batch["input_ids"].shape[1]:][:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch["labels"][:, 1:].reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
    assert n == int((batch["labels"] != IGNORE).sum())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
