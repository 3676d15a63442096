"""`trainer eval`: metrics of an artifact (or the bare base model) on a data file or task."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adapter_format.manifest import read_manifest
from trainer.data import (
    DataError,
    Example,
    encode_example,
    normalize_record,
    pick_pad_id,
    read_jsonl,
)
from trainer.evaluate import eval_loss, generation_eval


def _examples(data: str | None, task: str | None, split: str, limit: int | None) -> list[Example]:
    if task is not None:
        from trainer.tasks import TASKS, task_split

        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; bundled tasks: {', '.join(TASKS)}")
        rows = [normalize_record(r) for r in task_split(task, split)]
    else:
        rows = read_jsonl(data)
    return rows[:limit] if limit else rows


def load_model_and_tokenizer(adapter: str | None, base_model: str | None, device: str = "cpu"):
    """(model, tokenizer, manifest or None, base path) for an artifact or the base alone."""
    from transformers import AutoTokenizer

    from server.model_store import resolve_base_model
    from trainer.methods import load_base, load_for_inference

    manifest = None
    if adapter:
        if not (Path(adapter) / "switchboard.json").is_file() and \
                (Path(adapter) / "config.json").is_file():
            raise DataError(f"{adapter!r} is a model directory without a Switchboard manifest, "
                            f"not an adapter: evaluate it with --base-model {adapter}")
        manifest = read_manifest(adapter)
        if manifest.get("method") == "merged":  # `trainer merge` output: a whole model
            if base_model is not None:
                raise DataError(f"{adapter!r} is a merged model (base and adapter in one); "
                                "it takes no --base-model")
            model = load_base(adapter, device=device).eval()
            return model, AutoTokenizer.from_pretrained(adapter), manifest, Path(adapter)
        if base_model is None:
            saved = manifest["base_model"]
            base_model = saved["path"] if Path(saved["path"]).is_dir() else saved["id"]
        base_path = resolve_base_model(base_model)
        model = load_for_inference(adapter, manifest["training_method"], base_path, device)
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    else:
        base_path = resolve_base_model(base_model)
        model = load_base(base_path, device=device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    return model, tokenizer, manifest, base_path


def evaluate(adapter: str | None = None, base_model: str | None = None, data: str | None = None,
             task: str | None = None, split: str = "test", limit: int | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, predictions: str | None = None,
             device: str = "cpu") -> dict[str, Any]:
    examples = _examples(data, task, split, limit)
    model, tokenizer, manifest, _ = load_model_and_tokenizer(adapter, base_model, device)
    system_prompt = None
    if manifest is not None:
        trained = manifest.get("merged_from", {}).get("manifest", manifest)
        system_prompt = trained.get("trainer_config", {}).get("system_prompt")
    pad_id = manifest.get("pad_token_id") if manifest else None
    pad_id = pad_id if pad_id is not None else pick_pad_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, False, system_prompt) for ex in examples]
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"adapter": adapter, "method": manifest["method"] if manifest
                               else "base", "examples": len(examples),
                               "source": f"task:{task}/{split}" if task else data}
    metrics.update(eval_loss(model, encoded, pad_id, batch_size, device))
    gen, rows = generation_eval(model, tokenizer, examples, pad_id, max_new_tokens,
                                system_prompt, device, batch_size)
    metrics.update(gen)
    metrics["wall_s"] = time.perf_counter() - t0
    if predictions:
        with open(predictions, "w") as f:
            for prompt_ids, pred, ref, pred_ids in rows:
                row = {"prompt": tokenizer.decode(prompt_ids), "prompt_ids": prompt_ids,
                       "prediction": pred, "prediction_ids": pred_ids, "reference": ref}
                f.write(json.dumps(row) + "\n")
    return metrics
