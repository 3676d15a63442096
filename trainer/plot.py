"""`trainer plot RUN_DIR`: draw a run's `metrics.jsonl` to `RUN_DIR/metrics.png`.

Four panels over optimizer steps: training loss (every step) with the validation loss (each
evaluation), the learning rate, the gradient norm (before clipping), and the update ratio
||update|| / ||weights|| overall and per module group on a log scale, with the band outside
which the loop warns (trainer/monitor.py). Also drawn at the end of every run.
"""

from __future__ import annotations

from pathlib import Path

from trainer.monitor import UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW, read_metrics


class PlotError(ValueError):
    """Nothing to plot; the message names the file."""


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a run directory (run_dir of a "
                        "`trainer train` run)?")
    rows = read_metrics(path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval" and "eval_loss" in r]
    if not train:
        raise PlotError(f"{path} holds no training steps")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.5,
                label="validation loss")
    ax.set_yscale("log")
    ax.set_title("loss")
    ax.legend()
    ax = axes[0][1]
    ax.plot(steps, [r["learning_rate"] for r in train], lw=1.5)
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes[1][0]
    ax.plot(steps, [r["grad_norm"] for r in train], lw=1)
    ax.set_title("gradient norm (before clipping)")
    ax = axes[1][1]
    measured = [r for r in train if r.get("update_ratio") is not None]
    if measured:
        x = [r["step"] for r in measured]
        ax.plot(x, [r["update_ratio"] for r in measured], "o-", lw=2, color="black",
                label="all trainable")
        groups = sorted({g for r in measured for g in r.get("update_ratio_by_group", {})})
        for g in groups:
            pts = [(r["step"], r["update_ratio_by_group"].get(g)) for r in measured]
            pts = [(s, v) for s, v in pts if v]
            if pts and len(groups) > 1:
                ax.plot(*zip(*pts, strict=True), ".--", lw=1, label=g)
        values = [v for r in measured for v in [r["update_ratio"],
                                                *r.get("update_ratio_by_group", {}).values()]
                  if v]
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 3, max(values) * 3)  # the data, not the whole band
        ax.axhspan(UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH, color="green", alpha=0.06,
                   label=f"no warning ({UPDATE_RATIO_LOW:g} .. {UPDATE_RATIO_HIGH:g})")
        ax.legend(fontsize=8)
    ax.set_title("update ratio ||update|| / ||weights|| (logging steps)")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(output) if output else run_dir / "metrics.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
