"""PNG plot of a load test: latency over time and latency distributions (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

from .loadtest import LoadTestResult


def plot_loadtest(result: LoadTestResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok and r.e2e is not None]
    failed = [r for r in result.records if not r.ok]
    fig, (ax_time, ax_dist) = plt.subplots(2, 1, figsize=(10, 8))

    ax_time.scatter([r.start for r in ok], [r.e2e for r in ok], s=8, label="end-to-end")
    with_ttft = [r for r in ok if r.ttft is not None]
    if with_ttft:
        ax_time.scatter([r.start for r in with_ttft], [r.ttft for r in with_ttft], s=8,
                        label="time to first token")
    if failed:
        ax_time.scatter([r.start for r in failed], [0.0] * len(failed), marker="x",
                        color="red", label=f"errors ({len(failed)})")
    ax_time.set_xlabel("request start (s since test start)")
    ax_time.set_ylabel("latency (s)")
    ax_time.set_title(
        f"{result.requests_per_s:.2f} req/s, {result.output_tokens_per_s:.1f} output tok/s"
    )
    ax_time.legend(loc="upper left")
    ax_time.grid(alpha=0.3)

    series = [("end-to-end", [r.e2e for r in ok])]
    if with_ttft:
        series.append(("time to first token", [r.ttft for r in with_ttft]))
    itl = [x for r in ok for x in r.itl]
    if itl:
        series.append(("inter-token", itl))
    for label, values in series:
        ax_dist.hist(values, bins=40, alpha=0.5, label=label)
    for label, summary in (("e2e", result.e2e), ("ttft", result.ttft)):
        if summary.p99 is not None:
            ax_dist.axvline(summary.p99, linestyle="--", linewidth=1)
            ax_dist.text(summary.p99, ax_dist.get_ylim()[1] * 0.9, f" {label} p99",
                         fontsize=8)
    ax_dist.set_xlabel("latency (s)")
    ax_dist.set_ylabel("count")
    ax_dist.set_yscale("log")
    ax_dist.legend()
    ax_dist.grid(alpha=0.3)

    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
