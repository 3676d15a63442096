"""Trainer benchmark: every method on a bundled task, and LoRA speed against Trainer + PEFT.

    python -m benchmarks.trainer                      # everything (about an hour on 2 CPU cores)
    python -m benchmarks.trainer --methods lora --test-limit 100 --threads 1

Quality: the default model (SmolLM2-135M-Instruct) is evaluated on the test split of a
bundled task (exact match, BLEU, ROUGE-L, eval loss), then each method is trained with
`trainer train` and evaluated with `trainer eval` on the same test split. Every train/eval
runs in its own process, so the peak memory (max RSS, or CUDA max allocated) is its own.
Speed: LoRA training tokens/s of `trainer train` against a plain transformers Trainer +
PEFT run on the same model, examples (same token ids), batch size, steps and threads.
Each round runs the pair back to back, the first of the pair alternating from round to
round (ours first in even rounds); the reported ratio is the median of the rounds' ratios
(ours / theirs), each round's two figures and ratio are stored too.
`--speed-only` runs the speed part alone and keeps the other figures of the results file,
each part labelled (`parts`) with the date, command and settings of the run that measured it.
Results: benchmarks/results/trainer.json (with date, command line, commit and CPU) and a
table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, provenance, write_results

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "trainer.json"
TRAIN_LIMIT_S = 15 * 60  # the LoRA run must reach its target within this much training time

# Per-method settings for a short run; learning rates a little above the library defaults,
# since every method gets only a few hundred examples.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 1e-3},
    "qlora": {"learning_rate": 1e-3},
    "adapter": {"learning_rate": 1e-3},
    "ia3": {"learning_rate": 1e-2},
    "prompt_tuning": {"learning_rate": 3e-2, "num_virtual_tokens": 16},
    "p_tuning": {"learning_rate": 3e-3, "num_virtual_tokens": 16},
    "prefix_tuning": {"learning_rate": 1e-2, "num_virtual_tokens": 16},
    "full": {"learning_rate": 5e-5},
}


def _env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], threads: int | None, log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")


def train_method(method: str, args, work: Path, steps: int) -> dict[str, Any]:
    out = work / method / "adapter"
    over = {"method": method, "task": args.task, "task_train_size": max(steps * 8, 8),
            "batch_size": 8, "max_steps": steps, "eval_every": steps, "save_every": steps,
            "log_every": 10, "max_eval_examples": 64, "eval_generate_max": 0,
            "output_dir": str(out), "run_dir": str(work / method / "run"),
            "progress_bar": False, "warmup_steps": max(1, steps // 20), "seed": args.seed,
            **METHOD_SETTINGS[method]}
    if args.threads:
        over["threads"] = args.threads
    cmd = [sys.executable, "-m", "trainer.cli", "train", *[f"{k}={v}" for k, v in over.items()]]
    _run(cmd, args.threads, work / f"{method}.train.log")
    return json.loads((out / "switchboard.json").read_text())


def evaluate(adapter: Path | None, args, work: Path, name: str) -> dict[str, Any]:
    out = work / f"{name}.eval.json"
    cmd = [sys.executable, "-m", "trainer.cli", "eval", "--task", args.task, "--split", "test",
           "--limit", str(args.test_limit), "--max-new-tokens", str(args.max_new_tokens),
           "--output", str(out), "--predictions", str(work / f"{name}.predictions.jsonl")]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    _run(cmd, args.threads, work / f"{name}.eval.log")
    return json.loads(out.read_text())


# --- speed: ours against transformers' Trainer + PEFT -----------------------------------


def _speed_examples(task: str, n: int) -> list[dict[str, str]]:
    from trainer.tasks import task_split

    return task_split(task, "train", n)


def speed_ours(args, work: Path, rnd: int) -> dict[str, float]:
    data = work / "speed.jsonl"
    rows = _speed_examples(args.task, args.speed_steps * 8)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / f"speed-ours-{rnd}"
    over = {"method": "lora", "data": str(data), "val_fraction": 0.0, "batch_size": 8,
            "epochs": 1, "eval_generate_max": 0, "learning_rate": 2e-4, "output_dir": str(out),
            "run_dir": str(work / f"speed-ours-run-{rnd}"), "progress_bar": False,
            "tensorboard": False, "save_every": 10_000, "verify_reload": False,
            "dedup": False, "near_dedup": False}
    if args.threads:
        over["threads"] = args.threads
    cmd = [sys.executable, "-m", "trainer.cli", "train", *[f"{k}={v}" for k, v in over.items()]]
    _run(cmd, args.threads, work / f"speed-ours-{rnd}.log")
    m = json.loads((out / "switchboard.json").read_text())["metrics"]
    return {"tokens_per_s": m["train_tokens"] / m["train_wall_s"], "tokens": m["train_tokens"],
            "wall_s": m["train_wall_s"]}


def speed_baseline(args, work: Path, rnd: int) -> dict[str, float]:
    out = work / f"speed-hf-{rnd}.json"
    cmd = [sys.executable, "-m", "benchmarks.trainer", "--_baseline", str(out),
           "--task", args.task, "--speed-steps", str(args.speed_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    _run(cmd, args.threads, work / f"speed-hf-{rnd}.log")
    return json.loads(out.read_text())


def speed(args, work: Path) -> dict[str, Any]:
    """Paired rounds: ours and Trainer + PEFT back to back, the first of the pair
    alternating; the ratio reported is the median of the per-round ratios."""
    rounds = []
    for rnd in range(args.speed_rounds):
        order = ("ours", "hf") if rnd % 2 == 0 else ("hf", "ours")
        got = {}
        for who in order:
            got[who] = (speed_ours if who == "ours" else speed_baseline)(args, work, rnd)
        ratio = got["ours"]["tokens_per_s"] / got["hf"]["tokens_per_s"]
        rounds.append({"round": rnd, "first": "ours" if order[0] == "ours" else
                       "hf_trainer_peft", "ours": got["ours"], "hf_trainer_peft": got["hf"],
                       "ratio": ratio})
        print(f"speed round {rnd} ({order[0]} first): ours "
              f"{got['ours']['tokens_per_s']:.1f} tok/s, Trainer+PEFT "
              f"{got['hf']['tokens_per_s']:.1f} tok/s, ratio {ratio:.3f}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    return {
        "ratio_median": median(ratios), "ratios": ratios,
        "ours_tokens_per_s": [r["ours"]["tokens_per_s"] for r in rounds],
        "hf_trainer_peft_tokens_per_s": [r["hf_trainer_peft"]["tokens_per_s"] for r in rounds],
        "rounds": rounds, "target_ratio": 1.0,
        "how": "median over rounds of (ours tokens/s / Trainer+PEFT tokens/s); each round "
               "runs the pair back to back, ours first in even rounds, Trainer+PEFT first "
               "in odd rounds",
        "speed_rounds": args.speed_rounds, "steps": args.speed_steps, "batch_size": 8,
        "threads": args.threads, "task": args.task, "method": "lora",
    }


def _print_speed(sp: dict[str, Any]) -> None:
    ratios = ", ".join(f"{r:.3f}" for r in sp["ratios"])
    print(f"LoRA tokens/s vs Trainer+PEFT: median of {len(sp['ratios'])} paired rounds "
          f"{sp['ratio_median']:.3f}x ({ratios}; target >= 1.0)")


def _baseline_main(args) -> None:
    """A plain transformers Trainer + PEFT LoRA run: same model, token ids, batch, steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from server.model_store import resolve_base_model
    from trainer.data import encode_example, normalize_record, pick_pad_id

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_base_model(None)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.pad_token = tok.convert_ids_to_tokens(pick_pad_id(tok))
    rows = _speed_examples(args.task, args.speed_steps * 8)
    enc = [encode_example(tok, normalize_record(r)) for r in rows]
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                "labels": e.labels} for e in enc]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.wall = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=8, num_train_epochs=1,
            learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=10,
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, seed=42, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[clock],
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                               label_pad_token_id=-100))
        trainer.train()
    tokens = sum(len(e.input_ids) for e in enc)
    Path(args._baseline).write_text(json.dumps({"tokens_per_s": tokens / clock.wall,
                                                "tokens": tokens, "wall_s": clock.wall}))


# --- served greedy outputs against `trainer eval` ----------------------------------------


def serve_parity(work: Path, method: str, limit: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy outputs of `switchboard serve` for the adapter against `trainer eval`'s.

    The adapter root is `<work>/<method>` (its artifact is the sub-directory `adapter`, so
    the server's scan loads it as adapter id "adapter"); the prompts are the exact token ids
    `trainer eval` used (from its predictions file).
    """
    try:
        import grpc

        from benchmarks.common import Server
        from switchboard.v1 import switchboard_pb2 as pb
        from switchboard.v1 import switchboard_pb2_grpc as rpc
    except ImportError as e:
        return {"skipped": f"server or client pieces missing: {e}"}
    rows = [json.loads(line) for line in
            (work / f"{method}.predictions.jsonl").read_text().splitlines()][:limit]
    same, mismatches = 0, []
    with Server(["--adapter-dir", str(work / method)]) as server:
        stub = rpc.TextGenerationStub(grpc.insecure_channel(server.target))
        for row in rows:
            req = pb.GenerateRequest(
                adapter_id="adapter", token_ids=pb.TokenIds(ids=row["prompt_ids"]),
                sampling=pb.SamplingParameters(temperature=0.0),
                stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens))
            text = stub.Generate(req, timeout=300).text.strip()
            if text == row["prediction"]:
                same += 1
            elif len(mismatches) < 5:
                mismatches.append({"served": text, "trainer_eval": row["prediction"]})
    return {"prompts": len(rows), "identical": same, "fraction": same / max(len(rows), 1),
            "mismatches": mismatches}


# --- report ------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["method", "steps", "train_s", "tok/s", "peak_MB", "loss_before", "loss_after",
            "EM", "BLEU", "ROUGE-L"]
    lines = [" | ".join(f"{c:>11}" for c in cols)]
    for r in rows:
        vals = [r["method"], r.get("steps", ""), r.get("train_s"), r.get("tokens_per_s"),
                r.get("peak_memory_mb"), r.get("eval_loss_before"), r.get("eval_loss"),
                r.get("exact_match"), r.get("bleu"), r.get("rouge_l")]
        lines.append(" | ".join(
            f"{v:>11.3f}" if isinstance(v, float) else f"{'' if v is None else v!s:>11}"
            for v in vals))
    return "\n".join(lines)


PROVENANCE_KEYS = ("benchmark", "date", "command", "git_commit", "machine")


def _settings(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _part(args) -> dict[str, Any]:
    """Which run measured a part of the results: date, command, commit, machine, settings."""
    return {**provenance(), "settings": _settings(args), "load_avg_at_start": os.getloadavg()}


def _file_commit_date() -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%cI", "--", str(RESULTS)], cwd=REPO,
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else "unknown"


def _previous() -> dict[str, Any]:
    """The results file as it is, its provenance moved into `parts` (a file written before
    results carried a date gets the date of the last commit that changed it)."""
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    kept = {k: v for k, v in old.items() if k not in (*PROVENANCE_KEYS, "settings")}
    parts = kept.setdefault("parts", {})
    if old and not old.get("parts"):
        legacy = {"date": old.get("date") or _file_commit_date(),
                  "date_source": "results" if old.get("date") else
                  "commit date of the last commit that changed the results file (the file "
                  "carried no date)",
                  "command": old.get("command"), "git_commit": old.get("git_commit"),
                  "machine": old.get("machine"), "settings": old.get("settings")}
        for part in ("quality", "serve_parity", "speed"):
            if part in old or (part == "quality" and "methods" in old):
                parts[part] = legacy
    return kept


def _write(results: dict[str, Any]) -> None:
    write_results("trainer", results, RESULTS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="date_iso")
    p.add_argument("--methods", default="lora,qlora,adapter,ia3,prompt_tuning,p_tuning,"
                   "prefix_tuning,full")
    p.add_argument("--lora-steps", type=int, default=60, help="LoRA steps (batch 8)")
    p.add_argument("--steps", type=int, default=40, help="steps for the other methods")
    p.add_argument("--test-limit", type=int, default=200, help="test examples evaluated")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--speed-steps", type=int, default=12, help="steps per speed run")
    p.add_argument("--speed-rounds", type=int, default=3,
                   help="paired speed rounds; the ratio is their median (default 3)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--speed-only", action="store_true",
                   help="only the speed part; keep the file's other figures (and their dates)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default=None, help="keep artifacts here (default: temp)")
    p.add_argument("--parity-limit", type=int, default=50,
                   help="test prompts compared between the server and trainer eval (0: skip)")
    p.add_argument("--parity-only", action="store_true",
                   help="only the server parity step, on an existing --work-dir")
    p.add_argument("--_baseline", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._baseline:
        _baseline_main(args)
        return 0
    if args.speed_rounds < 1:
        p.error("--speed-rounds must be at least 1")
    if args.speed_only and (args.skip_speed or args.parity_only):
        p.error("--speed-only with --skip-speed or --parity-only")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="switchboard-bench-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.parity_only or args.speed_only:
        results = _previous()
        if args.parity_only:
            results["parts"]["serve_parity"] = _part(args)
            results["serve_parity"] = serve_parity(work, "lora", args.parity_limit,
                                                   args.max_new_tokens)
            print(json.dumps(results["serve_parity"], indent=2))
        else:
            results["parts"]["speed"] = _part(args)
            print(f"work dir: {work}", flush=True)
            results["speed"] = speed(args, work)
            _print_speed(results["speed"])
        _write(results)
        print(f"results: {RESULTS}")
        return 0
    parts: dict[str, Any] = {"quality": _part(args)}
    results: dict[str, Any] = {
        "task": args.task, "model": "smollm2-135m-instruct", "parts": parts,
        "method_settings": METHOD_SETTINGS, "work_dir": str(work),
    }
    print(f"work dir: {work}", flush=True)
    base = evaluate(None, args, work, "base")
    rows = [{"method": "base", **{k: base[k] for k in ("eval_loss", "exact_match", "bleu",
                                                        "rouge_l")}}]
    results["base"] = base
    print(f"base: exact match {base['exact_match']:.3f}, eval loss {base['eval_loss']:.4f}",
          flush=True)
    results["methods"] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        steps = args.lora_steps if method == "lora" else args.steps
        t0 = time.perf_counter()
        manifest = train_method(method, args, work, steps)
        m = manifest["metrics"]
        ev = evaluate(work / method / "adapter", args, work, method)
        row = {"method": method, "steps": m["steps"], "train_s": m["train_wall_s"],
               "process_wall_s": time.perf_counter() - t0, "tokens_per_s": m["tokens_per_s"],
               "peak_memory_mb": m["peak_memory_mb"], "eval_loss_before": base["eval_loss"],
               "eval_loss": ev["eval_loss"], "exact_match": ev["exact_match"],
               "bleu": ev["bleu"], "rouge_l": ev["rouge_l"],
               "validation_loss_before": m["eval_loss_before"],
               "validation_loss_after": m["eval_loss"]}
        results["methods"][method] = row
        rows.append(row)
        print(_table(rows[-1:]), flush=True)
        _write(results)  # partial results survive
    if "lora" in results["methods"]:
        lora = results["methods"]["lora"]
        results["quality_check"] = {
            "lora_exact_match": lora["exact_match"], "target": 0.9,
            "base_exact_match": base["exact_match"], "base_limit": 0.2,
            "lora_train_s": lora["train_s"], "time_limit_s": TRAIN_LIMIT_S,
            "passed": lora["exact_match"] >= 0.9 and base["exact_match"] < 0.2
            and lora["train_s"] <= TRAIN_LIMIT_S,
        }
    if "lora" in results["methods"] and args.parity_limit:
        parts["serve_parity"] = _part(args)
        try:
            results["serve_parity"] = serve_parity(work, "lora", args.parity_limit,
                                                   args.max_new_tokens)
        except Exception as e:  # the server is another component: report, don't hide figures
            results["serve_parity"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"server parity: {results['serve_parity']}", flush=True)
    if not args.skip_speed:
        parts["speed"] = _part(args)
        results["speed"] = speed(args, work)
    _write(results)
    print()
    print(_table(rows))
    if "quality_check" in results:
        q = results["quality_check"]
        print(f"\nLoRA exact match {q['lora_exact_match']:.3f} (target >= 0.9) in "
              f"{q['lora_train_s']:.0f} s; base {q['base_exact_match']:.3f} (target < 0.2): "
              f"{'PASS' if q['passed'] else 'FAIL'}")
    if "speed" in results:
        _print_speed(results["speed"])
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
