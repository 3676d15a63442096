"""`trainer eval` and `trainer merge`."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_fixtures import base_overrides
from transformers import AutoModelForCausalLM

from trainer.cli import main
from trainer.config import load_config
from trainer.evaluate import task_metrics
from trainer.evaluation_cli import evaluate, load_model_and_tokenizer
from trainer.merge import MergeError, merge
from trainer.train import train


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """One small artifact per method used here, trained once for the module."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for method in ("lora", "ia3", "prompt_tuning", "qlora"):
        over = base_overrides(tiny_base, root / method, method=method, eval_generate_max=0,
                              learning_rate=1e-2)
        train(load_config(None, over))
        out[method] = root / method / "adapters" / "out"
    return out


def test_task_metrics():
    m = task_metrics(["2021-03-05", "x y z", "a"], ["2021-03-05", "x y q", "b"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert 0 < m["rouge_l"] < 1 and 0 <= m["bleu"] <= 100
    assert task_metrics(["same words"], ["same words"])["bleu"] == pytest.approx(100.0, abs=1e-6)


def test_eval_cli_adapter_and_base(trained, tiny_base, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    out = tmp_path / "metrics.json"
    rc = main(["eval", "--adapter", str(trained["lora"]), "--task", "date_iso", "--limit", "6",
               "--max-new-tokens", "6", "--predictions", str(preds), "--output", str(out)])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["examples"] == 6 and metrics["method"] == "lora"
    for key in ("eval_loss", "eval_perplexity", "exact_match", "bleu", "rouge_l"):
        assert key in metrics
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    base = evaluate(base_model=str(tiny_base), task="date_iso", limit=6, max_new_tokens=6)
    assert base["method"] == "base" and base["eval_loss"] != metrics["eval_loss"]


def test_eval_greedy_matches_plain_generate(trained):
    """What eval reports is what PEFT's own generate gives for the same prompt."""
    rows = evaluate(adapter=str(trained["prompt_tuning"]), task="date_iso", limit=3,
                    max_new_tokens=5, predictions=None)
    model, tok, manifest, _ = load_model_and_tokenizer(str(trained["prompt_tuning"]), None)
    from trainer.data import normalize_record, prompt_and_reference
    from trainer.tasks import task_split

    ex = normalize_record(task_split("date_iso", "test")[0])
    ids, _ = prompt_and_reference(tok, ex)
    gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                         pad_token_id=manifest["pad_token_id"])
    text = tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
    single = evaluate(adapter=str(trained["prompt_tuning"]), task="date_iso", limit=1,
                      max_new_tokens=5, predictions=None)
    assert single["exact_match"] == float(text == ex["messages"][-1]["content"])
    assert rows["examples"] == 3


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_gives_the_same_logits(method, trained, tmp_path):
    out = merge(trained[method], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model, *_ = load_model_and_tokenizer(str(trained[method]), None)
    ids = torch.tensor([[3, 50, 99, 120, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    manifest = json.loads((out / "switchboard.json").read_text())
    assert manifest["method"] == "merged" and manifest["merged_from"]["method"] == method
    assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize(("method", "kwargs", "message"), [
    ("prompt_tuning", {}, "cannot merge a prompt_tuning adapter"),
    ("qlora", {}, "trained against a 4-bit nf4 base"),
    ("lora", {"quantize": "nf4"}, "cannot merge into a nf4 base"),
])
def test_merge_refusals(method, kwargs, message, trained, tmp_path):
    with pytest.raises(MergeError, match=message):
        merge(trained[method], tmp_path / "merged", **kwargs)
    assert not (tmp_path / "merged").exists()


def test_merge_cli_refusal_exit_code(trained, tmp_path, capsys):
    rc = main(["merge", "--adapter", str(trained["prompt_tuning"]), "--output",
               str(tmp_path / "m")])
    assert rc == 2 and "cannot merge a prompt_tuning adapter" in capsys.readouterr().err


def test_task_metrics_english_use_13a_and_words():
    from sacrebleu.metrics import BLEU

    preds = ["the cat sat on the mat", "hello, world"]
    refs = ["the cat sat on a mat", "hello world"]
    m = task_metrics(preds, refs)
    assert m["cjk_references"] == 0 and m["text_tokenization"] == "bleu 13a, rouge_l words"
    # one tokenization per example gives sacrebleu's own default-tokenizer score here
    want = BLEU(effective_order=True).corpus_score(preds, [refs]).score
    assert m["bleu"] == pytest.approx(want, abs=1e-9)
    assert m["rouge_l"] == pytest.approx((5 / 6 + 1.0) / 2)


def test_task_metrics_chinese_use_zh_and_characters():
    from sacrebleu.metrics import BLEU

    preds = ["我的密码是一二三", "今天天气很好"]
    refs = ["我的密码是一二四", "今天天气很好"]
    m = task_metrics(preds, refs)
    assert m["cjk_references"] == 2 and m["text_tokenization"] == "bleu zh, rouge_l characters"
    # ROUGE-L over characters: 7 of 8 characters in common, then a perfect match
    assert m["rouge_l"] == pytest.approx((7 / 8 + 1.0) / 2)
    assert m["bleu"] == pytest.approx(
        BLEU(tokenize="zh", effective_order=True).corpus_score(preds, [refs]).score, abs=1e-9)
    assert 50 < m["bleu"] < 100
    # what the defaults gave: no tokens for rouge-score, whole sentences as words for 13a
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rougeL"]).score(refs[0], preds[0])["rougeL"].fmeasure == 0
    assert BLEU(effective_order=True).corpus_score(preds, [refs]).score < m["bleu"]


def test_task_metrics_choose_per_example():
    m = task_metrics(["2021-03-05", "今天天气很好"], ["2021-03-05", "今天天气不好"])
    assert m["cjk_references"] == 1 and "for the 1 CJK references" in m["text_tokenization"]
    # the English reference scores whole words (1.0), the Chinese one characters (5/6)
    assert m["rouge_l"] == pytest.approx((1.0 + 5 / 6) / 2)


def test_merge_checks_the_task_and_records_it(trained, tmp_path, capsys):
    rc = main(["merge", "--adapter", str(trained["lora"]), "--output", str(tmp_path / "m")])
    assert rc == 0
    check = json.loads(capsys.readouterr().out)["merge_check"]
    # the training run's validation examples (max_eval_examples 8), adapter against merged
    assert check["examples"] == 8 and check["source"] == "task:date_iso (validation)"
    assert check["metric"] == "exact_match" and check["dtype"] == "fp32"
    a, m = check["adapter"], check["merged"]
    assert m["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert m["exact_match"] == a["exact_match"]
    saved = json.loads((tmp_path / "m" / "switchboard.json").read_text())
    assert saved["metrics"]["merge_check"] == check
    # `trainer eval --adapter` on the merged output: the adapter's figures
    merged_eval = evaluate(adapter=str(tmp_path / "m"), task="date_iso", limit=6,
                           max_new_tokens=6)
    adapter_eval = evaluate(adapter=str(trained["lora"]), task="date_iso", limit=6,
                            max_new_tokens=6)
    assert merged_eval["method"] == "merged"
    assert merged_eval["eval_loss"] == pytest.approx(adapter_eval["eval_loss"], rel=1e-5)
    assert merged_eval["exact_match"] == adapter_eval["exact_match"]


def test_merge_into_another_base_is_refused(trained, tiny_base, tmp_path):
    """Merging into a base other than the one trained on (here the same model with its
    weights moved by noise, as a further fine-tune of it would): the check compares the
    adapter as trained with the merge and refuses, writing nothing."""
    drifted = tmp_path / "drifted-base"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(drifted))
    with pytest.raises(MergeError, match=r"merge refused, nothing written: the merged model's "
                                         r"validation loss rises"):
        merge(trained["lora"], tmp_path / "m", base_model=str(drifted))
    assert not (tmp_path / "m").exists()


def test_merge_to_bf16_is_checked_as_saved(trained, tmp_path):
    from safetensors import safe_open

    out = merge(trained["ia3"], tmp_path / "bf16", dtype="bf16")
    check = json.loads((out / "switchboard.json").read_text())["metrics"]["merge_check"]
    assert check["dtype"] == "bf16"
    # rounding the weights to bf16 moves the loss, a little
    change = abs(check["merged"]["eval_loss"] / check["adapter"]["eval_loss"] - 1)
    assert 0 < change <= check["loss_tolerance"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    again = evaluate(adapter=str(out), task="date_iso", split="validation", limit=8,
                     max_new_tokens=8)
    assert again["eval_loss"] == pytest.approx(check["merged"]["eval_loss"], rel=1e-6)


def test_merge_verdict_on_the_task_metric():
    from trainer.merge import verdict

    a = {"exact_match": 0.95, "bleu": 98.0, "eval_loss": 0.010}
    assert verdict("exact_match", a, {**a, "exact_match": 0.94}, 0.02, 0.02) is None
    why = verdict("exact_match", a, {**a, "exact_match": 0.90}, 0.02, 0.02)
    assert why and "loses exact_match: 0.9000 against the adapter's 0.9500" in why
    assert verdict("bleu", a, {**a, "bleu": 97.0}, 0.02, 0.02) is None  # BLEU on a 0..1 scale
    assert "loses bleu" in verdict("bleu", a, {**a, "bleu": 95.0}, 0.02, 0.02)
    assert "loss rises" in verdict("exact_match", a, {**a, "eval_loss": 0.0103}, 0.02, 0.02)
    # a better merged model is never refused
    assert verdict("exact_match", a, {"exact_match": 1.0, "eval_loss": 0.001}, 0.0, 0.0) is None


def test_merge_check_needs_the_validation_data(tiny_base, tmp_path, chat_file):
    over = base_overrides(tiny_base, tmp_path, method="lora", task=None, data=str(chat_file),
                          val_fraction=0.25, eval_generate_max=0, plot=False)
    del over["task"], over["task_train_size"]
    train(load_config(None, over))
    adapter = tmp_path / "adapters" / "out"
    chat_file.unlink()
    with pytest.raises(MergeError, match="pass --data FILE or --task NAME"):
        merge(adapter, tmp_path / "m")
    out = merge(adapter, tmp_path / "m", task="date_iso", limit=4)
    check = json.loads((out / "switchboard.json").read_text())["metrics"]["merge_check"]
    assert check["source"] == "task:date_iso/validation" and check["examples"] == 4


def test_eval_adapter_on_a_plain_model_dir_says_what_to_pass(tiny_base, trained, tmp_path,
                                                             capsys):
    rc = main(["eval", "--adapter", str(tiny_base), "--task", "date_iso", "--limit", "2"])
    assert rc == 2
    assert f"evaluate it with --base-model {tiny_base}" in capsys.readouterr().err
    merged = merge(trained["lora"], tmp_path / "m", check=False)
    assert json.loads((merged / "switchboard.json").read_text())["metrics"]["merge_check"] is None
    rc = main(["eval", "--adapter", str(merged), "--base-model", str(tiny_base), "--task",
               "date_iso", "--limit", "2"])
    assert rc == 2 and "is a merged model" in capsys.readouterr().err
