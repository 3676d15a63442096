"""`trainer train`: config -> data -> method -> loop -> artifact.

The loop is a plain PyTorch loop rather than transformers' Trainer: it needs per-token
loss normalisation across accumulation steps *and* DDP ranks, checkpoints that hold only
the trainable tensors (the bottleneck adapter and soft prompts included), and an artifact
in our layout; with Trainer each of those is an override. It reads top to bottom: learning
rate from `lr_at`, accumulate, clip, step, log, evaluate, checkpoint, stop early.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_format.manifest import ArtifactError, write_atomic
from trainer import checkpoint, dist
from trainer.cleaning import CleaningReport, clean, drop_over_length
from trainer.config import ConfigError, TrainConfig, dump_config
from trainer.data import (
    Encoded,
    Example,
    collate,
    encode_example,
    fingerprint,
    normalize_record,
    pick_pad_id,
    preview,
    read_jsonl,
    split_train_val,
    stop_ids,
)
from trainer.evaluate import eval_loss, generation_eval, loss_sum
from trainer.fsdp import full_trainable_state
from trainer.methods import (
    MERGEABLE,
    SERVED_METHOD,
    build_trainable,
    count_parameters,
    load_for_inference,
    load_trainable_state,
    save_weights,
    trainable_state,
)
from trainer.monitor import MetricsLog, UpdateRatio, UpdateRatioWatch, format_ratios

log = logging.getLogger("trainer")
# A reload runs the same weights through the same kernels, so its logits match the trained
# model's bit for bit on every machine we have measured (all eight methods, fp32 and nf4);
# a BLAS may still pick a differently blocked path for differently aligned buffers, so the
# comparison allows this many units in the last place at the scale of the logits.
RELOAD_ULPS = 64


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched checkpoint); one line for the user."""


@dataclass
class PreparedData:
    train: list[Encoded]
    val: list[Encoded]
    val_examples: list[Example]
    report: CleaningReport
    fingerprint: str
    source: str


def resolve_base(cfg: TrainConfig) -> tuple[Path | str, str]:
    """(path for from_pretrained, public base model id)."""
    from server.model_store import bundled_model, resolve_base_model

    bundled = bundled_model(cfg.base_model)  # the default or another short name
    path = resolve_base_model(cfg.base_model or None)
    return path, bundled.model_id if bundled else cfg.base_model


def load_tokenizer(base_path: Path | str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer of {base_path} has no EOS token")
    if tok.chat_template is None:
        raise ConfigError(f"tokenizer of {base_path} has no chat template")
    return tok


def _encode_all(cfg: TrainConfig, tokenizer, examples: list[Example], report: CleaningReport
                ) -> tuple[list[Example], list[Encoded]]:
    enc = [encode_example(tokenizer, ex, cfg.train_on_prompt, cfg.system_prompt)
           for ex in examples]
    keep = drop_over_length(examples, [len(e.input_ids) for e in enc], cfg.max_seq_len, report)
    kept_ex = [examples[i] for i in keep]
    kept_enc = [enc[i] for i in keep if enc[i].n_trained > 0]
    return kept_ex, kept_enc


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    report = CleaningReport()
    opts = dict(dedup=cfg.dedup, near_dedup=cfg.near_dedup, redact_pii=cfg.redact_pii,
                blocklist=cfg.blocklist)
    if cfg.task is not None:
        from trainer.tasks import task_split

        def load(split: str, size: int | None = None) -> list[Example]:
            rows = task_split(cfg.task, split, size)
            return [{**normalize_record(r), "line": i + 1} for i, r in enumerate(rows)]

        train_raw, val_raw = load("train", cfg.task_train_size), load("validation")
        source = f"task:{cfg.task}"
    else:
        train_raw = read_jsonl(cfg.data)
        source = str(cfg.data)
        val_raw = read_jsonl(cfg.eval_data) if cfg.eval_data else []
    train_ex, report = clean(train_raw, report=report, **opts)
    if val_raw:
        val_ex, _ = clean(val_raw, **opts)
    else:
        train_ex, val_ex = split_train_val(train_ex, cfg.val_fraction, cfg.seed)
    train_ex, train = _encode_all(cfg, tokenizer, train_ex, report)
    if cfg.max_eval_examples is not None:
        val_ex = val_ex[:cfg.max_eval_examples]
    val_ex, val = _encode_all(cfg, tokenizer, val_ex, CleaningReport(kept=len(val_ex)))
    if not train:
        raise ConfigError(f"no training examples left after cleaning {source} "
                          f"(dropped: {report.dropped})")
    return PreparedData(train, val, val_ex, report, fingerprint(train_ex + val_ex), source)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_scheduler == "constant":
        return cfg.lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = cfg.min_lr_ratio
    if cfg.lr_scheduler == "linear":
        return cfg.lr * (1 - progress * (1 - floor))
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """The examples of global step `step`: a fresh seeded permutation per epoch, so any run
    (resumed or not, any world size) sees the same global batches in the same order."""
    per_epoch = n // global_batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * global_batch:(pos + 1) * global_batch].tolist()


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric == "eval_loss" else new > best


def _autocast(cfg: TrainConfig, device: str):
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def parameter_counts(cfg: TrainConfig, model, base_path) -> tuple[int, int]:
    """(trainable, total): the base's own count (its safetensors headers) plus what the
    method adds; counting qlora's tensors would halve its base (two 4-bit values a byte)."""
    from trainer.auto import base_parameter_count

    trainable, _ = count_parameters(model)
    return trainable, base_parameter_count(base_path) + (0 if cfg.method == "full"
                                                         else trainable)


def dry_run_text(cfg: TrainConfig, model, data: PreparedData, tokenizer, base_path) -> str:
    trainable, total = parameter_counts(cfg, model, base_path)
    lines = ["resolved config:", dump_config(cfg),
             f"trainable parameters: {trainable:,} of {total:,} "
             f"({100 * trainable / max(total, 1):.4f}%)",
             f"data: {len(data.train)} train / {len(data.val)} validation examples from "
             f"{data.source}; dropped {data.report.dropped or 'none'}",
             "first training example (trained tokens in [[...]], the rest masked):",
             preview(tokenizer, data.train[0])]
    return "\n".join(lines)


def train(cfg: TrainConfig, dry_run: bool = False) -> dict[str, Any]:
    """Run one training job; returns the manifest written (or the dry-run summary)."""
    info = dist.setup()
    try:
        return _train(cfg, info, dry_run)
    finally:
        dist.teardown(info)


def _train(cfg: TrainConfig, info: dist.DistInfo, dry_run: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    base_path, base_id = resolve_base(cfg)
    tokenizer = load_tokenizer(base_path)
    pad_id = pick_pad_id(tokenizer)
    data = prepare_data(cfg, tokenizer)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world
    if len(data.train) < global_batch:
        raise ConfigError(f"{len(data.train)} training examples are fewer than one global batch "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x "
                          f"{info.world} processes = {global_batch})")
    steps_per_epoch = len(data.train) // global_batch
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    device = info.device
    choice = None
    if cfg.method == "auto":
        from trainer.auto import NoMethodFits, describe, resolve_auto

        try:
            cfg, choice = resolve_auto(cfg, base_path, len(data.train), device)
        except NoMethodFits as e:
            raise ConfigError(f"method auto: {e}") from None
        if info.main:
            log.info("%s", describe(choice))

    seed_all(cfg.seed)  # same initial adapter weights on every rank and every run
    fsdp = info.enabled and cfg.parallelism == "fsdp"
    # FSDP: built whole on the host, then each rank keeps (and moves to its device) 1/world
    model = build_trainable(cfg, base_path, "cpu" if fsdp else device)
    if dry_run:
        text = dry_run_text(cfg, model, data, tokenizer, base_path)
        if choice is not None:
            text = describe(choice) + "\n" + text
        if info.main:
            print(text)
        return {"dry_run": text}
    model.train()
    if fsdp:
        from trainer import fsdp as fsdp_lib

        fsdp_lib.shard(model)  # before the optimizer: it must hold the sharded parameters
        per_rank = fsdp_lib.parameters_per_rank(model)
        if info.main:
            log.info("fsdp: %d ranks hold %s of %d parameters", info.world, per_rank,
                     fsdp_lib.total_numel(model))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    ddp = None
    if info.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if device.startswith("cuda") else None
        ddp = DistributedDataParallel(model, device_ids=ids)
    forward_model = ddp or model
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    run_dir = cfg.resolved_run_dir
    state: dict[str, Any] = {"best_metric": None, "best_step": None, "bad_evals": 0,
                             "history": [], "stopped_early": False,
                             "data_fingerprint": data.fingerprint, "method": cfg.method,
                             "global_batch": global_batch, "total_steps": total}
    start = 0
    if cfg.resume and checkpoint.list_checkpoints(run_dir):
        path = checkpoint.list_checkpoints(run_dir)[-1]
        weights, saved = checkpoint.load_checkpoint(path, optimizer)
        for key in ("data_fingerprint", "method", "global_batch", "total_steps"):
            if saved.get(key) != state[key]:
                raise TrainingError(f"cannot resume from {path}: its {key} is {saved.get(key)!r}, "
                                    f"this run's is {state[key]!r}")
        load_trainable_state(model, weights)
        state.update(saved)
        start = saved["step"]
        log.info("resumed from %s at step %d", path, start)
    else:
        if cfg.resume:
            log.warning("resume requested but no checkpoint in %s; starting fresh", run_dir)
        if info.main:
            checkpoint.clear(run_dir)
        dist.barrier(info)

    if "eval_loss_before" not in state and data.val:
        state["eval_loss_before"] = eval_loss(model, data.val, pad_id, cfg.batch_size,
                                              device)["eval_loss"]
    writer = None
    if info.main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", start) if info.main else None
    update_ratio = UpdateRatio(model, sharded=fsdp)
    ratio_watch = UpdateRatioWatch()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, disable=not (info.main and cfg.progress_bar),
               desc=f"train {cfg.method}", dynamic_ncols=True)
    b, accum = cfg.batch_size, cfg.grad_accum
    window_loss, window_steps, window_tokens = 0.0, 0, 0
    tokens_total, t_loop = 0, time.perf_counter()
    train_time, window_time = 0.0, 0.0  # seconds in training steps (evaluation excluded)
    step = start
    for step in range(start, total):
        t_step = time.perf_counter()
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, len(data.train), global_batch, cfg.seed)
        # Loss = sum over the global batch's trained tokens / their count; DDP averages
        # gradients over ranks, hence the factor `world`.
        global_tokens = sum(data.train[i].n_trained for i in idx)
        mine = idx[info.rank * b * accum:(info.rank + 1) * b * accum]
        loss_here, tokens_here = 0.0, 0
        for k in range(accum):
            batch = collate([data.train[i] for i in mine[k * b:(k + 1) * b]], pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            sync = nullcontext() if ddp is None or k == accum - 1 else ddp.no_sync()
            with sync:
                with _autocast(cfg, device):
                    s, _ = loss_sum(forward_model, batch)
                scaled = s * info.world / global_tokens
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_here += float(s.detach())
            tokens_here += int(batch["attention_mask"].sum())
        loss_all, tokens_all = dist.all_reduce_sum(info, [loss_here, float(tokens_here)])
        loss = loss_all / global_tokens
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step + 1} (learning rate {lr:.3g}); "
                                "aborted. Lower learning_rate, check the data or use fp32")
        if scaler:
            scaler.unscale_(optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if fsdp else grad_norm)
        log_step = (step + 1) % cfg.log_every == 0 or step + 1 == total
        if log_step:
            update_ratio.before()  # a copy of the trainable weights, on logging steps only
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            if not math.isfinite(grad_norm):
                raise TrainingError(f"gradient norm is {grad_norm} at step {step + 1}; aborted. "
                                    "Lower learning_rate or check the data")
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        ratios = update_ratio.after() if log_step else {}
        step_time = time.perf_counter() - t_step
        train_time += step_time
        window_time += step_time
        tokens_total += int(tokens_all)
        window_loss += loss
        window_steps += 1
        window_tokens += int(tokens_all)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if metrics_log:
            metrics_log.write({"kind": "train", "step": done, "loss": loss, "learning_rate": lr,
                               "grad_norm": grad_norm, "tokens": int(tokens_all),
                               "step_s": step_time, **ratios})

        if log_step:
            tps = window_tokens / max(window_time, 1e-9)
            avg = window_loss / window_steps
            state["train_loss"] = avg
            state["update_ratio"] = ratios["update_ratio"]
            state["history"].append({"kind": "train", "step": done, "train_loss": avg,
                                     "learning_rate": lr, "grad_norm": grad_norm,
                                     "tokens_per_s": tps, **ratios})
            if info.main:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f update_ratio %s "
                         "tokens/s %.0f", done, total, avg, lr, grad_norm,
                         format_ratios(ratios), tps)
                warning = ratio_watch.observe(done, ratios["update_ratio"])
                if warning:
                    log.warning("%s", warning)
                if writer:
                    writer.add_scalar("train/loss", avg, done)
                    writer.add_scalar("train/learning_rate", lr, done)
                    writer.add_scalar("train/grad_norm", grad_norm, done)
                    writer.add_scalar("train/tokens_per_s", tps, done)
                    for key, value in [("update_ratio", ratios["update_ratio"]),
                                       *((f"update_ratio/{g}", v) for g, v in
                                         ratios["update_ratio_by_group"].items())]:
                        if value is not None:
                            writer.add_scalar(f"train/{key}", value, done)
            window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0

        stop = False
        if data.val and (done % cfg.eval_every == 0 or done == total):
            metrics = eval_loss(model, data.val, pad_id, cfg.batch_size, device)
            if cfg.metric_for_best != "eval_loss":
                gen, _ = generation_eval(model, tokenizer,
                                         data.val_examples[:cfg.eval_generate_max], pad_id,
                                         cfg.max_new_tokens, cfg.system_prompt, device)
                metrics.update(gen)
            state["history"].append({"kind": "eval", "step": done, **metrics})
            value = metrics[cfg.metric_for_best]
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if metrics_log:
                metrics_log.write({"kind": "eval", "step": done, **numeric})
            if info.main:
                log.info("eval step %d: %s", done,
                         " ".join(f"{k} {v:.4f}" for k, v in numeric.items()))
                if writer:
                    for k, v in numeric.items():
                        writer.add_scalar(f"eval/{k}", v, done)
            if _better(cfg.metric_for_best, value, state["best_metric"]):
                state.update(best_metric=value, best_step=done, bad_evals=0)
                if cfg.load_best:
                    best_weights = full_trainable_state(model) if fsdp else None
                    if info.main:
                        checkpoint.save_best(run_dir, best_weights or trainable_state(model))
            else:
                state["bad_evals"] += 1
                patience = cfg.early_stopping_patience
                if patience and state["bad_evals"] >= patience:
                    stop = True
                    state["stopped_early"] = True
                    if info.main:
                        log.info("early stopping at step %d: no improvement of %s for %d "
                                 "evaluations (best %.4f at step %d)", done, cfg.metric_for_best,
                                 state["bad_evals"], state["best_metric"], state["best_step"])
        if done % cfg.save_every == 0 or done == total or stop:
            weights = full_trainable_state(model) if fsdp else None
            if info.main:  # FSDP: the optimizer's moments stay sharded, not checkpointed
                checkpoint.save_checkpoint(run_dir, done, weights or trainable_state(model),
                                           None if fsdp else optimizer, state,
                                           cfg.save_total_limit)
            dist.barrier(info)
        if stop:
            break
    bar.close()
    train_wall = time.perf_counter() - t_loop
    state["step"] = step + 1 if total > start else start
    if writer:
        writer.close()
    if metrics_log:
        metrics_log.close()
        (run_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
        if cfg.plot:
            from trainer.plot import plot_run

            try:
                log.info("plot: %s", plot_run(run_dir))
            except Exception as e:  # a picture is never worth failing a finished run for
                log.warning("could not draw %s: %s", run_dir / "metrics.png", e)

    dist.barrier(info)
    if fsdp:  # rank 0 goes on with a plain copy of the model holding the trained weights
        weights = full_trainable_state(model)
        del model, optimizer, params, decay, no_decay, update_ratio
        if not info.main:
            dist.barrier(info)
            return {}
        seed_all(cfg.seed)
        model = build_trainable(cfg, base_path, device)
        load_trainable_state(model, weights)
    if cfg.load_best and state["best_step"] is not None and state["best_step"] != state["step"]:
        best = checkpoint.load_best(run_dir)
        if best is not None:
            load_trainable_state(model, best)
            log.info("loaded the best weights (step %d, %s %.4f)", state["best_step"],
                     cfg.metric_for_best, state["best_metric"])
    manifest: dict[str, Any] = {}
    if info.main:
        model.eval()
        metrics = {"train_loss": state.get("train_loss"),
                   "eval_loss_before": state.get("eval_loss_before")}
        if data.val:
            metrics.update(eval_loss(model, data.val, pad_id, cfg.batch_size, device))
            if cfg.eval_generate_max:
                gen, _ = generation_eval(model, tokenizer,
                                         data.val_examples[:cfg.eval_generate_max], pad_id,
                                         cfg.max_new_tokens, cfg.system_prompt, device)
                metrics.update(gen)
        trainable, total_params = parameter_counts(cfg, model, base_path)
        metrics.update(trainable_parameters=trainable, total_parameters=total_params,
                       update_ratio=state.get("update_ratio"),
                       parallelism=cfg.parallelism if info.enabled else None,
                       parameters_per_rank=per_rank if fsdp else None)
        metrics.update(steps=state["step"], best_step=state["best_step"], train_tokens=tokens_total,
                       stopped_early=state["stopped_early"],
                       tokens_per_s=tokens_total / max(train_time, 1e-9) if tokens_total else None,
                       train_wall_s=train_wall, wall_s=time.perf_counter() - t_start,
                       peak_memory_mb=_peak_memory_mb(device), world_size=info.world)
        manifest = build_manifest(cfg, base_path, base_id, data, metrics, model, tokenizer,
                                  pad_id)
        if choice is not None:
            manifest["method_choice"] = choice.to_dict()
        probe = collate((data.val or data.train)[:4], pad_id)
        write_artifact(cfg, model, tokenizer, pad_id, base_path, manifest, data.report, probe)
        log.info("wrote %s (%s)", cfg.output_dir, json.dumps(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    dist.barrier(info)
    return manifest


def build_manifest(cfg: TrainConfig, base_path, base_id: str, data: PreparedData,
                   metrics: dict[str, Any], model, tokenizer, pad_id: int) -> dict[str, Any]:
    from server.model_store import model_fingerprint

    m: dict[str, Any] = {
        "method": SERVED_METHOD[cfg.method],
        "training_method": cfg.method,
        "format": {"adapter": "bottleneck", "full": "full_model"}.get(cfg.method, "peft"),
        "base_model": {"id": base_id, "path": str(base_path),
                       "fingerprint": model_fingerprint(base_path),
                       "quantization": "nf4" if cfg.method == "qlora" else None},
        "trainer_config": cfg.to_dict(),
        "data": {"source": data.source, "fingerprint": data.fingerprint,
                 "train_examples": len(data.train), "validation_examples": len(data.val),
                 "report": "data_report.json"},
        "metrics": metrics,
        "mergeable": cfg.method in MERGEABLE,
        "exports": {},
        "chat_template": "chat_template.jinja",
        "eos_token_id": tokenizer.eos_token_id,
        "stop_token_ids": list(stop_ids(tokenizer)),
        "pad_token_id": pad_id,
    }
    if cfg.method in ("lora", "qlora"):
        m["rank"] = cfg.lora_r
    if cfg.method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        m["num_virtual_tokens"] = cfg.num_virtual_tokens
    if cfg.method in ("prompt_tuning", "p_tuning"):
        # PEFT stores the virtual token embeddings themselves ([num_virtual_tokens, hidden]),
        # for p_tuning the prompt encoder's output: what a server prepends to the prompt.
        m["virtual_token_embeddings"] = {"file": "adapter_model.safetensors",
                                         "tensor": "prompt_embeddings"}
    return m


def write_artifact(cfg: TrainConfig, model, tokenizer, pad_id: int, base_path, manifest,
                   report: CleaningReport, probe: dict[str, torch.Tensor]) -> Path:
    """Write the artifact atomically; it only appears if its reload matches `model`."""

    def fill(tmp: Path) -> None:
        save_weights(model, cfg.method, tmp)
        tok = tokenizer
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        tok.save_pretrained(str(tmp))
        if not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
        (tmp / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if cfg.verify_reload:
            manifest.setdefault("metrics", {}).update(
                verify_reload(model, tmp, cfg.method, base_path, probe))

    return write_atomic(cfg.output_dir, fill, manifest)


@torch.no_grad()
def verify_reload(model, path: Path, method: str, base_path, probe) -> dict[str, float]:
    """Reload the artifact as a consumer would and check it is the trained model: every
    trained tensor (and a 4-bit base's packed weights and scales) equal bit for bit, and
    the logits on `probe` equal within RELOAD_ULPS of their scale. Raises ArtifactError."""
    device = next(model.parameters()).device
    model.eval()
    reloaded = load_for_inference(path, method, base_path, device=str(device))
    differing = differing_tensors(model, reloaded, method)
    if differing:
        raise ArtifactError(f"reloaded artifact differs from the trained model: {len(differing)} "
                            f"tensor(s) not bit-identical, first {differing[:3]}")
    batch = {k: v.to(device) for k, v in probe.items() if k != "labels"}
    mask = batch["attention_mask"].bool()
    n = mask.shape[1]
    a = model(**batch).logits[:, -n:][mask]
    r = reloaded(**batch).logits[:, -n:][mask]
    diff = float((a - r).abs().max())
    tolerance = RELOAD_ULPS * torch.finfo(a.dtype).eps * max(1.0, float(a.abs().max()))
    if not diff <= tolerance:
        raise ArtifactError(f"reloaded artifact differs from the trained model: max |logit diff| "
                            f"{diff:.3g} > {tolerance:.3g} ({RELOAD_ULPS} ulps of the logits' "
                            f"scale in {a.dtype})")
    return {"reload_max_abs_diff": diff, "reload_tolerance": tolerance}


def differing_tensors(model, reloaded, method: str) -> list[str]:
    """Names of the tensors the reload should reproduce exactly but does not: the trained
    ones, and for a 4-bit base the quantized weights and their quantization state."""
    got = dict(reloaded.named_parameters())
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if method == "p_tuning":  # the artifact holds the encoder's output, not the encoder
        want = {}
    out = [n for n, p in want.items() if n not in got or not torch.equal(p, got[n])]
    if method == "qlora":
        import bitsandbytes as bnb

        fresh = {n: m for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                other = fresh.get(name)
                if other is None or not _same_4bit(module, other):
                    out.append(name + ".weight (4-bit)")
    return out


def _same_4bit(a, b) -> bool:
    qa, qb = a.weight.quant_state, b.weight.quant_state
    if getattr(qa, "packing_format_for_cpu", False) or getattr(qb, "packing_format_for_cpu", False):
        return False  # repacked for a bf16 kernel: not what training ran (load_base)
    da, db = qa.as_dict(packed=True), qb.as_dict(packed=True)
    return (torch.equal(a.weight.data, b.weight.data) and da.keys() == db.keys()
            and all(torch.equal(da[k], db[k]) for k in da))
