"""`trainer merge`: fold a LoRA or IA3 adapter into a full-precision copy of its base.

Refused for soft-prompt methods (their virtual tokens are not a weight delta), for the
bottleneck adapter (a non-linear block), for QLoRA adapters (trained against nf4 weights)
and for a quantized target base.

Checked twice before anything is written: the merged logits against base + adapter on a
probe (float32, `MERGE_TOLERANCE`), then the task itself: the adapter and the merged model
(rounded to `--dtype` as saved) are evaluated on the same validation examples (those the
training run reported on, or `--task`/`--data`); the adapter on the base it was trained on
even when `--base-model` names another to merge into. A merge whose task metric drops by
more than `tolerance` or whose validation loss rises by more than `loss_tolerance`
(relative) is refused. The figures go into the merged model's manifest (`merge_check`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from adapter_format.manifest import read_manifest, write_atomic

log = logging.getLogger(__name__)
MERGE_TOLERANCE = 1e-3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASK_TOLERANCE = 0.02  # absolute drop of exact match (or BLEU / 100, ROUGE-L) allowed
LOSS_TOLERANCE = 0.02  # relative rise of the validation loss allowed


class MergeError(ValueError):
    """The adapter cannot be merged; the message says why."""


def check_examples(manifest: dict[str, Any], tokenizer, task: str | None = None,
                   data: str | None = None, limit: int = 64) -> tuple[list, str]:
    """(examples, source) to compare adapter and merged model on: `task` (validation split)
    or `data` (a JSONL file) when given, else the validation examples of the training run
    as its manifest records them (bundled task, eval_data, or the val_fraction split of data).
    """
    from trainer.config import config_from_dict
    from trainer.data import normalize_record, read_jsonl

    if task is not None:
        from trainer.tasks import task_split

        rows = [normalize_record(r) for r in task_split(task, "validation")][:limit]
        return rows, f"task:{task}/validation"
    if data is not None:
        return read_jsonl(data)[:limit], data
    saved = manifest.get("trainer_config") or {}
    for key in ("data", "eval_data"):
        path = saved.get(key)
        if path and not Path(path).is_file():
            raise MergeError(f"the quality check needs the training run's validation data, but "
                             f"its {key} file {path!r} is not here: pass --data FILE or --task "
                             "NAME to check on other examples, or --no-check to merge unchecked")
    from trainer.train import prepare_data

    prepared = prepare_data(config_from_dict(saved), tokenizer)
    if not prepared.val_examples:
        raise MergeError("the training run had no validation examples: pass --data FILE or "
                         "--task NAME for the quality check, or --no-check")
    return prepared.val_examples[:limit], f"{prepared.source} (validation)"


def quality(model, tokenizer, examples: list, pad_id: int, system_prompt: str | None,
            max_new_tokens: int) -> dict[str, Any]:
    from trainer.data import encode_example
    from trainer.evaluate import eval_loss, generation_eval

    encoded = [encode_example(tokenizer, ex, False, system_prompt) for ex in examples]
    metrics = dict(eval_loss(model, encoded, pad_id, batch_size=16))
    gen, _ = generation_eval(model, tokenizer, examples, pad_id, max_new_tokens, system_prompt)
    metrics.update(gen)
    return metrics


def verdict(metric: str, adapter: dict[str, Any], merged: dict[str, Any], tolerance: float,
            loss_tolerance: float) -> str | None:
    """Why the merge is refused, or None. BLEU (0..100) is compared on a 0..1 scale."""
    scale = 100.0 if metric == "bleu" else 1.0
    drop = (adapter[metric] - merged[metric]) / scale
    if drop > tolerance:
        return (f"the merged model loses {metric}: {merged[metric]:.4f} against the adapter's "
                f"{adapter[metric]:.4f} (drop {drop:.4f} > tolerance {tolerance})")
    rise = (merged["eval_loss"] - adapter["eval_loss"]) / max(adapter["eval_loss"], 1e-12)
    if rise > loss_tolerance:
        return (f"the merged model's validation loss rises: {merged['eval_loss']:.6f} against "
                f"the adapter's {adapter['eval_loss']:.6f} (+{100 * rise:.3f}% > "
                f"{100 * loss_tolerance:g}%)")
    return None


def _recorded_base(manifest: dict[str, Any]) -> Path | None:
    """The base the adapter was trained on, if it is on this machine."""
    from server.model_store import resolve_base_model

    saved = manifest.get("base_model") or {}
    if saved.get("path") and Path(saved["path"]).is_dir():
        return Path(saved["path"])
    try:
        return Path(resolve_base_model(saved.get("id")))
    except Exception:  # not provisioned here: the check runs on the given base alone
        return None


def merge(adapter: str | Path, output: str | Path, base_model: str | None = None,
          quantize: str = "none", dtype: str = "fp32", check: bool = True,
          task: str | None = None, data: str | None = None, limit: int = 64,
          tolerance: float = TASK_TOLERANCE, loss_tolerance: float = LOSS_TOLERANCE,
          max_new_tokens: int | None = None) -> Path:
    from transformers import AutoTokenizer

    from server.model_store import model_fingerprint
    from trainer.evaluation_cli import load_model_and_tokenizer

    manifest = read_manifest(adapter)
    method = manifest.get("training_method", manifest.get("method"))
    if quantize not in (None, "none"):
        raise MergeError(f"cannot merge into a {quantize} base: merging needs full-precision "
                         "weights (use --quantize none and quantize the merged model later)")
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if method == "merged":
        raise MergeError(f"{str(adapter)!r} is already a merged model")
    if method == "qlora":
        raise MergeError("cannot merge a qlora adapter: it was trained against a 4-bit nf4 base, "
                         "so merging it into full-precision weights changes its outputs")
    if method not in ("lora", "ia3"):
        raise MergeError(f"cannot merge a {manifest['method']} adapter: only lora and ia3 "
                         "adapters are weight deltas that can be merged")
    model, tokenizer, _, base_path = load_model_and_tokenizer(str(adapter), base_model)
    if getattr(model.base_model.model.config, "quantization_config", None):
        raise MergeError("cannot merge into a quantized base model; give a full-precision base")
    saved = manifest.get("trainer_config") or {}
    system_prompt = saved.get("system_prompt")
    pad_id = manifest["pad_token_id"]
    new_tokens = max_new_tokens or int(saved.get("max_new_tokens") or 64)
    metric = saved.get("metric_for_best", "exact_match")
    metric = metric if metric in ("exact_match", "bleu", "rouge_l") else "exact_match"
    merge_check: dict[str, Any] | None = None
    if check:
        examples, source = check_examples(manifest, tokenizer, task, data, limit)
        reference = model
        recorded = _recorded_base(manifest)
        if recorded is not None and Path(recorded).resolve() != Path(base_path).resolve():
            # merging into another base than the one trained on: the reference is the
            # adapter as trained (and as a server loads it), on its recorded base
            log.info("merge check: the adapter on its recorded base %s against the merge "
                     "into %s", recorded, base_path)
            reference, *_ = load_model_and_tokenizer(str(adapter), str(recorded))
        before_q = quality(reference, tokenizer, examples, pad_id, system_prompt, new_tokens)
        del reference
    probe = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        before = model(input_ids=probe).logits
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(input_ids=probe).logits
        diff = float((before - after).abs().max())
        if diff > MERGE_TOLERANCE:
            raise MergeError(f"merged model differs from base+adapter: max |logit diff| "
                             f"{diff:.3g} > {MERGE_TOLERANCE}")
        if dtype != "fp32":  # what a float32 load of the saved weights will compute
            for p in merged.parameters():
                p.copy_(p.to(DTYPES[dtype]).float())
    if check:
        after_q = quality(merged, tokenizer, examples, pad_id, system_prompt, new_tokens)
        merge_check = {"metric": metric, "source": source, "examples": len(examples),
                       "dtype": dtype, "tolerance": tolerance, "loss_tolerance": loss_tolerance,
                       "adapter": {k: before_q[k] for k in (metric, "eval_loss")},
                       "merged": {k: after_q[k] for k in (metric, "eval_loss")}}
        log.info("merge check on %d examples of %s: %s adapter %.4f merged %.4f; eval_loss "
                 "adapter %.6f merged %.6f", len(examples), source, metric, before_q[metric],
                 after_q[metric], before_q["eval_loss"], after_q["eval_loss"])
        why = verdict(metric, before_q, after_q, tolerance, loss_tolerance)
        if why:
            raise MergeError(f"merge refused, nothing written: {why} on {len(examples)} "
                             f"examples of {source}. Merge into the base the adapter was "
                             "trained on, in fp32, keep serving the adapter, or raise "
                             "--tolerance / --loss-tolerance if the loss is acceptable")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))

    def fill(tmp: Path) -> None:
        merged.to(DTYPES[dtype]).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    out_manifest = {
        "method": "merged", "merged_from": {"adapter": str(adapter), "method": manifest["method"],
                                             "manifest": manifest},
        "base_model": {**manifest["base_model"], "merged_fingerprint": None},
        "mergeable": False, "exports": {}, "dtype": dtype,
        "pad_token_id": pad_id, "eos_token_id": manifest.get("eos_token_id"),
        "stop_token_ids": manifest.get("stop_token_ids"),
        "metrics": {"merge_max_abs_diff": diff, "merge_check": merge_check},
    }
    path = write_atomic(output, fill, out_manifest)
    log.info("merged %s into %s (max |logit diff| %.2g)", adapter, path, diff)
    out_manifest["base_model"]["merged_fingerprint"] = model_fingerprint(path)
    from adapter_format.manifest import update_manifest

    update_manifest(path, base_model=out_manifest["base_model"])
    return path
