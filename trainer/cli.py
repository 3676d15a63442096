"""`trainer` command line: train, eval, merge, plot, tasks, export-onnx (trainer/onnx_export.py).

Exit codes: 0 success, 1 training or artifact failure, 2 bad usage, config or data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("trainer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Switchboard fine-tuning toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an adapter from a YAML config")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, trainable parameters and a tokenized "
                        "example, then exit without training")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    e = sub.add_parser("eval", help="loss, perplexity and task metrics of an adapter or base")
    e.add_argument("--adapter", help="artifact directory (omit to evaluate the base model)")
    e.add_argument("--base-model", default=None, help="base model path or id (default: the "
                   "artifact's base, or the default model)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL file in any accepted shape")
    src.add_argument("--task", help="bundled task name")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--predictions", help="write prompts, predictions, references as JSONL")
    e.add_argument("--output", help="write the metrics as JSON to this file")

    m = sub.add_parser("merge", help="merge a LoRA or IA3 adapter into a full-precision base")
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--base-model", default=None)
    m.add_argument("--quantize", default="none", choices=("none", "int8", "nf4"),
                   help="quantization of the base to merge into (only none is supported)")
    m.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the saved merged weights")
    m.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the task check (adapter vs merged model on validation examples)")
    m.add_argument("--task", help="check on this bundled task's validation split instead of "
                   "the training run's validation examples")
    m.add_argument("--data", help="check on this JSONL file instead")
    m.add_argument("--limit", type=int, default=64, help="examples for the check (default 64)")
    m.add_argument("--tolerance", type=float, default=0.02, help="largest drop of the task "
                   "metric (exact match, or BLEU/100, ROUGE-L) accepted (default 0.02)")
    m.add_argument("--loss-tolerance", type=float, default=0.02, help="largest relative rise "
                   "of the validation loss accepted (default 0.02)")
    m.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the training run's max_new_tokens")

    x = sub.add_parser("export-onnx", help="merge a lora/ia3 adapter and export it to ONNX with "
                       "a KV cache; parity-checked, recorded in the adapter's manifest")
    x.add_argument("adapter_dir")
    x.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="weights: none (fp32), int8 or int4 (weight-only MatMulNBits blocks)")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--base-model", default=None,
                   help="base model path or id (default: the adapter's recorded base)")

    g = sub.add_parser("plot", help="draw a run's metrics.jsonl (loss, validation loss, "
                       "learning rate, gradient norm, update ratio) to a PNG")
    g.add_argument("run_dir", help="the run directory (run_dir of `trainer train`)")
    g.add_argument("--output", help="PNG path (default: RUN_DIR/metrics.png)")

    k = sub.add_parser("tasks", help="list bundled tasks, or write one's splits as JSONL")
    k.add_argument("name", nargs="?")
    k.add_argument("--out", help="directory for <split>.jsonl files")
    return p


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    from adapter_format.manifest import ArtifactError
    from trainer.config import ConfigError
    from trainer.data import DataError

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "merge":
            from trainer.merge import merge

            path = merge(args.adapter, args.output, base_model=args.base_model,
                         quantize=args.quantize, dtype=args.dtype, check=args.check,
                         task=args.task, data=args.data, limit=args.limit,
                         tolerance=args.tolerance, loss_tolerance=args.loss_tolerance,
                         max_new_tokens=args.max_new_tokens)
            from adapter_format.manifest import read_manifest

            check = read_manifest(path)["metrics"]["merge_check"]
            print(json.dumps({"merged": str(path), "merge_check": check}, indent=2))
            return 0
        if args.command == "tasks":
            try:
                return _tasks(args)
            except KeyError as e:
                print(f"error: {e.args[0]}", file=sys.stderr)
                return 2
        if args.command == "export-onnx":
            return _export_onnx(args)
        if args.command == "plot":
            from trainer.plot import PlotError, plot_run

            try:
                print(plot_run(args.run_dir, args.output))
            except PlotError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from trainer.merge import MergeError
        from trainer.train import TrainingError

        if isinstance(e, MergeError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 2


def _train(args) -> int:
    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config(args.config, args.overrides)  # validated before any model loads
    train(cfg, dry_run=args.dry_run)
    return 0


def _export_onnx(args) -> int:
    from trainer.onnx_export import ExportError, ParityError, export_onnx

    try:
        record = export_onnx(args.adapter_dir, quantize=args.quantize, opset=args.opset,
                             base_model=args.base_model)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ParityError) else 2
    print(json.dumps({k: record[k] for k in ("path", "quantize", "size_bytes",
                                             "export_seconds", "parity")}, indent=2))
    return 0


def _eval(args) -> int:
    from trainer.evaluation_cli import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    metrics = evaluate(adapter=args.adapter, base_model=args.base_model, data=args.data,
                       task=args.task, split=args.split, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       predictions=args.predictions)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def _tasks(args) -> int:
    from pathlib import Path

    from trainer.tasks import SPLIT_SIZES, TASKS, task_split

    if not args.name:
        for name, fn in TASKS.items():
            doc = (sys.modules[fn.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} {doc}")
        return 0
    if not args.out:
        print(json.dumps(task_split(args.name, "train")[:3], indent=2))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SIZES:
        with open(out / f"{split}.jsonl", "w") as f:
            for row in task_split(args.name, split):
                f.write(json.dumps(row) + "\n")
    print(f"wrote {', '.join(f'{s}.jsonl' for s in SPLIT_SIZES)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
