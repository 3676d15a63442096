"""End to end on the bundled Gemma 3 270M: train a LoRA, evaluate it, serve it, compare.

1. `trainer train --config trainer/configs/lora_date_iso_gemma.yaml` (LoRA on the bundled
   `date_iso` task with `base_model: gemma-3-270m`), unless --adapter names a trained one;
2. `trainer eval` of the base and of the adapter on the first --limit examples of the
   task's split (greedy, --max-new-tokens), with `--predictions` (prompt ids, answer ids);
3. `switchboard serve --base-model gemma-3-270m --adapter-dir ...` as a process, and the
   same prompts sent over gRPC with the project's client (as chat messages, rendered by the
   server's chat template), with the adapter and without, all in flight together so base
   and adapter rows share batches;
4. each server answer compared with trainer eval's token for token (the prompt's token
   count, the answer's token ids up to and including the stop token, and the text).

Writes benchmarks/results/gemma_e2e.json. Exit 0 when every answer is identical.

    python -m benchmarks.gemma_e2e [--limit 64] [--adapter DIR] [--work DIR] [--out F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Server, print_table, write_results

CONFIG = REPO / "trainer" / "configs" / "lora_date_iso_gemma.yaml"
BASE = "gemma-3-270m"
ADAPTER_ID = "dates-gemma"


def trainer(args: list[str]) -> float:
    """Run `trainer ...` as a process (this tree's code); its wall time in seconds."""
    cmd = [sys.executable, "-m", "trainer.cli", *[str(a) for a in args]]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - t0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainer_eval(work: Path, name: str, source: list[str], task: str, split: str, limit: int,
                 max_new_tokens: int, reuse: bool = False
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], float | None]:
    """(metrics, predictions rows, wall seconds) of `trainer eval`; with `reuse`, those of
    an earlier run in `work` with the same arguments (wall None)."""
    out, preds = work / f"eval-{name}.json", work / f"predictions-{name}.jsonl"
    args = work / f"eval-{name}.args"
    key = json.dumps([*map(str, source), task, split, limit, max_new_tokens])
    if reuse and out.is_file() and preds.is_file() and args.is_file() \
            and args.read_text() == key:
        print(f"reusing {out} and {preds}", flush=True)
        return json.loads(out.read_text()), read_jsonl(preds), None
    wall = trainer(["eval", *source, "--task", task, "--split", split, "--limit", limit,
                    "--max-new-tokens", max_new_tokens, "--predictions", preds,
                    "--output", out])
    args.write_text(key)
    return json.loads(out.read_text()), read_jsonl(preds), wall


def server_answers(target: str, jobs: list[tuple[str, str]], max_new_tokens: int) -> list:
    """(adapter id, user message) -> GenerateResult, all sent at once (greedy)."""
    from clients.client import SwitchboardClient

    with SwitchboardClient(target) as client, ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(client.chat, [{"role": "user", "content": text}],
                               adapter_id=adapter, temperature=0.0,
                               max_new_tokens=max_new_tokens, token_ids_out=True, timeout=600)
                   for adapter, text in jobs]
        return [f.result() for f in futures]


def compare(rows: list[dict[str, Any]], answers: list) -> dict[str, Any]:
    """Server answers against trainer eval's predictions, token for token."""
    same, diffs = 0, []
    for i, (row, ans) in enumerate(zip(rows, answers, strict=True)):
        checks = {"prompt_tokens": (ans.prompt_tokens, len(row["prompt_ids"])),
                  "token_ids": (list(ans.token_ids), row["prediction_ids"]),
                  "text": (ans.text.strip(), row["prediction"])}
        bad = {k: {"server": s, "trainer_eval": t} for k, (s, t) in checks.items() if s != t}
        if bad:
            diffs.append({"index": i, "prompt": row["prompt"], **bad})
        else:
            same += 1
    exact = sum(a.text.strip() == r["reference"] for r, a in zip(rows, answers, strict=True))
    return {"prompts": len(rows), "identical": same, "server_exact_match": exact / len(rows),
            "differences": diffs[:10]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--adapter", type=Path, default=None,
                   help="an artifact trained with --config already (skips training)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: temp)")
    p.add_argument("--base-model", default=BASE,
                   help="the base (short name or directory); the config's base_model is "
                        "overridden when it differs")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=64, help="prompts compared (at least 50)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--reuse-evals", action="store_true",
                   help="take trainer eval's results from an earlier run in --work (same "
                        "adapter path, task, limit and tokens) instead of running it again")
    p.add_argument("--train-arg", action="append", default=[],
                   help="extra key=value for trainer train (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results/gemma_e2e.json)")
    a = p.parse_args(argv)
    import yaml

    task = yaml.safe_load(a.config.read_text())["task"]
    with tempfile.TemporaryDirectory(prefix="gemma-e2e-") as tmp:
        work = (a.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        train_wall = None
        if a.adapter is None:
            a.adapter = work / "adapters" / ADAPTER_ID
            train_wall = trainer(["train", "--config", a.config, f"output_dir={a.adapter}",
                                  f"run_dir={work / 'run'}", "progress_bar=false",
                                  f"base_model={a.base_model}", *a.train_arg])
        adapter = a.adapter.resolve()
        manifest = json.loads((adapter / "switchboard.json").read_text())
        base_m, base_rows, base_wall = trainer_eval(
            work, "base", ["--base-model", a.base_model], task, a.split, a.limit, a.max_new_tokens,
            a.reuse_evals)
        ad_m, ad_rows, ad_wall = trainer_eval(
            work, "adapter", ["--adapter", adapter], task, a.split, a.limit, a.max_new_tokens,
            a.reuse_evals)
        from trainer.tasks import task_split

        users = [r["prompt"] for r in task_split(task, a.split)[:a.limit]]
        jobs = [("", u) for u in users] + [(adapter.name, u) for u in users]
        t0 = time.perf_counter()
        with Server(["--base-model", a.base_model, "--adapter-dir", adapter.parent,
                     "--max-batch-size", 32, "--max-seq-len", 256]) as server:
            answers = server_answers(server.target, jobs, a.max_new_tokens)
            server_log_tail = server.lines[-5:]
        serve_wall = time.perf_counter() - t0
    n = len(users)
    base_cmp, ad_cmp = compare(base_rows, answers[:n]), compare(ad_rows, answers[n:])
    result = {
        "model": a.base_model, "task": task, "split": a.split, "prompts": n,
        "max_new_tokens": a.max_new_tokens,
        "config": str(a.config.relative_to(REPO)) if a.config.is_relative_to(REPO)
        else str(a.config),
        "trained_here": train_wall is not None, "train_wall_s": train_wall,
        "trainer_metrics": {k: manifest["metrics"].get(k) for k in (
            "train_loss", "eval_loss_before", "eval_loss", "steps", "train_tokens",
            "tokens_per_s", "train_wall_s", "trainable_parameters", "total_parameters",
            "reload_max_abs_diff")},
        "trainer_config": manifest["trainer_config"],
        "stop_token_ids": manifest.get("stop_token_ids"),
        "base": {"exact_match": base_m["exact_match"], "eval_loss": base_m["eval_loss"],
                 "bleu": base_m["bleu"], "rouge_l": base_m["rouge_l"],
                 "eval_wall_s": base_wall, "server": base_cmp},
        "adapter": {"exact_match": ad_m["exact_match"], "eval_loss": ad_m["eval_loss"],
                    "bleu": ad_m["bleu"], "rouge_l": ad_m["rouge_l"],
                    "eval_wall_s": ad_wall, "server": ad_cmp},
        "identical_server_vs_trainer_eval": base_cmp["identical"] + ad_cmp["identical"],
        "compared": 2 * n, "serve_wall_s": serve_wall, "server_log_tail": server_log_tail,
    }
    print_table(f"{a.base_model} end to end ({task} {a.split}, first {n}, greedy, "
                f"{a.max_new_tokens} new tokens)", [
        ("base exact match (trainer eval)", base_m["exact_match"]),
        ("adapter exact match (trainer eval)", ad_m["exact_match"]),
        ("base: server == trainer eval", f"{base_cmp['identical']}/{n}"),
        ("adapter: server == trainer eval", f"{ad_cmp['identical']}/{n}"),
    ])
    path = write_results("gemma_e2e", result, a.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["identical_server_vs_trainer_eval"] == res["compared"] else 1)
