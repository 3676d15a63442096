"""The method comparison table: every training method on the same task, one command.

    flock /tmp/cpu.lock .venv/bin/python -m benchmarks.methods            # writes the table
    python -m benchmarks.methods --steps 30 --batch-size 8 --eval-limit 64  # a longer run

For each method (and the base model alone) on the same bundled task, the same examples,
batch, steps and seed: trainable parameters (count and % of the model), peak memory (max
RSS of its own process, or CUDA max allocated), training tokens/s, training wall time and
the task quality on the first `--eval-limit` validation examples (greedy; exact match,
BLEU, ROUGE-L, eval loss), all as `trainer train` records them in the artifact's manifest.
Each method trains in its own process. The learning rates are the short-run ones of
benchmarks/trainer.py (METHOD_SETTINGS).

The table replaces the one between the markers in docs/trainer.md (`--no-docs` to skip);
the figures go to benchmarks/results/methods.json with date, command, commit and CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, provenance, write_results
from benchmarks.trainer import METHOD_SETTINGS, _run

METHODS = ("lora", "qlora", "adapter", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning",
           "full")
DOC = REPO / "docs" / "trainer.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def train_one(method: str, args, work: Path) -> dict[str, Any]:
    out = work / method / "adapter"
    over = {"method": method, "task": args.task, "base_model": args.base_model,
            "task_train_size": args.steps * args.batch_size, "batch_size": args.batch_size,
            "max_steps": args.steps, "eval_every": args.steps, "save_every": args.steps,
            "log_every": max(1, args.steps // 3), "max_eval_examples": args.eval_limit,
            "eval_generate_max": args.eval_limit, "max_new_tokens": args.max_new_tokens,
            "warmup_steps": 1, "seed": args.seed, "output_dir": str(out),
            "run_dir": str(work / method / "run"), "progress_bar": False, "tensorboard": False,
            "plot": False, **METHOD_SETTINGS[method]}
    if args.threads:
        over["threads"] = args.threads
    cmd = [sys.executable, "-m", "trainer.cli", "train", *[f"{k}={v}" for k, v in over.items()]]
    t0 = time.perf_counter()
    _run(cmd, args.threads, work / f"{method}.log")
    m = json.loads((out / "switchboard.json").read_text())["metrics"]
    return {"method": method, "process_wall_s": time.perf_counter() - t0,
            **{k: m.get(k) for k in ("trainable_parameters", "total_parameters",
                                     "peak_memory_mb", "tokens_per_s", "train_wall_s",
                                     "eval_loss", "exact_match", "bleu", "rouge_l",
                                     "update_ratio", "text_tokenization")}}


def eval_base(args, work: Path) -> dict[str, Any]:
    out = work / "base.json"
    cmd = [sys.executable, "-m", "trainer.cli", "eval", "--task", args.task, "--split",
           "validation", "--limit", str(args.eval_limit), "--max-new-tokens",
           str(args.max_new_tokens), "--output", str(out)]
    if args.base_model != "default":
        cmd += ["--base-model", args.base_model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    _run(cmd, args.threads, work / "base.log")
    m = json.loads(out.read_text())
    return {"method": "base", **{k: m.get(k) for k in ("eval_loss", "exact_match", "bleu",
                                                       "rouge_l")}}


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = ["| method | trainable params | trainable % | peak MB | tokens/s | train s | "
             "eval loss | EM | BLEU | ROUGE-L |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = (100 * r["trainable_parameters"] / r["total_parameters"]
               if r.get("total_parameters") else None)
        lines.append(
            f"| {r['method']} | {f(r.get('trainable_parameters'), ',')} | {f(pct, '.3f')} | "
            f"{f(r.get('peak_memory_mb'), '.0f')} | {f(r.get('tokens_per_s'), '.0f')} | "
            f"{f(r.get('train_wall_s'), '.1f')} | {f(r.get('eval_loss'), '.3f')} | "
            f"{f(r.get('exact_match'), '.2f')} | {f(r.get('bleu'), '.1f')} | "
            f"{f(r.get('rouge_l'), '.3f')} |")
    return "\n".join(lines)


def write_doc(text: str, doc: Path = DOC) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="date_zh")
    p.add_argument("--base-model", default="default")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/trainer.md")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        work = Path(tmp)
        rows.append(eval_base(args, work))
        for method in methods:
            print(f"training {method} ...", flush=True)
            rows.append(train_one(method, args, work))
            # written after each method, so an interrupted run keeps what it measured
            report(rows, methods, args, time.perf_counter() - t0)
    print(table(rows))
    return 0


def report(rows: list[dict[str, Any]], methods: list[str], args, wall: float) -> None:
    text = table(rows)
    prov = provenance()
    done = [r["method"] for r in rows[1:]]
    settings = {k: getattr(args, k) for k in ("task", "base_model", "steps", "batch_size",
                                              "eval_limit", "max_new_tokens", "threads", "seed")}
    write_results("methods", {"settings": settings, "learning_rates": {
        m: METHOD_SETTINGS[m]["learning_rate"] for m in methods}, "rows": rows,
        "complete": done == methods, "benchmark_wall_s": wall})
    if not args.no_docs:
        cpu = prov["machine"].get("cpu", "?")
        missing = [m for m in methods if m not in done]
        note = (f"Measured {prov.get('date', '?')[:10]} on {cpu} "
                f"({prov['machine'].get('cores')} cores), commit {prov.get('git_commit', '?')}, "
                f"{wall / 60:.1f} min in all: `{prov.get('command', '')}`. Task `{args.task}`, "
                f"{args.steps} steps of batch {args.batch_size} "
                f"({args.steps * args.batch_size} examples), quality on the first "
                f"{args.eval_limit} validation examples (greedy, {args.max_new_tokens} new "
                f"tokens). benchmarks/results/methods.json."
                + (f" Not measured yet: {', '.join(missing)}." if missing else ""))
        write_doc(f"{note}\n\n{text}")


if __name__ == "__main__":
    sys.exit(main())
