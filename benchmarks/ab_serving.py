"""The served throughput of two source trees, alternated in one run: "did this change make
serving slower?" answered on a noisy machine.

Each side is a revision checked out into a temporary git worktree (or `.`, the working
tree as it is), started as its own `switchboard serve` with the same flags (plus a side's
own through --before-arg / --after-arg), both up for the whole run. The serving
benchmark's 16 rank-16 all-projection adapters (benchmarks.serving.make_adapters), 32
streaming gRPC clients, each request naming the next adapter, --new-tokens each; per
round, each side's base-only load then its 16-adapter load, the sides' order swapped every
round. Reported: per side the median tok/s and the adapters' overhead ratio (median over
rounds of 16 adapters / base only), and the median over rounds of the per-round ratio
after / before (the two measured minutes apart, not an hour). Two settings of one tree:
`--before . --after .` with --before-arg / --after-arg.

    python -m benchmarks.ab_serving --before 8fd529f [--after .] [--rounds 4]
        [--requests 32] [--new-tokens 64] [--dtype float32]
        [--after-arg=--prefix-cache-memory=0]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import REPO, Server, median, print_table, write_results
from benchmarks.serving import load, make_adapters
from server.model_store import provision_default_model


def worktree(rev: str, parent: Path) -> Path:
    if rev == ".":
        return REPO
    path = parent / f"tree-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a git revision, or . (the working tree)")
    p.add_argument("--after", default=".")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--before-arg", action="append", default=[])
    p.add_argument("--after-arg", action="append", default=[])
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model_dir = provision_default_model()
    sides = {"before": (a.before, a.before_arg), "after": (a.after, a.after_arg)}
    results: dict[str, dict[str, list[float]]] = {s: {"base": [], "adapters": []}
                                                  for s in sides}
    trees: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        root = Path(tmp) / "adapters"
        names = tuple(make_adapters(model_dir, root, a.adapters, 16))
        common = ["--base-model", model_dir, "--adapter-dir", root,
                  "--max-batch-size", a.clients, "--max-active-adapters", a.adapters,
                  "--max-lora-rank", 16, "--max-seq-len", 1024, "--kv-cache-memory", "2GiB",
                  "--device", "cpu", "--dtype", a.dtype]
        servers = {}
        try:
            for side, (rev, extra) in sides.items():
                tree = worktree(rev, Path(tmp))
                if tree != REPO:
                    trees.append(tree)
                servers[side] = Server([*common, *extra], cwd=tree)
            for s in servers.values():  # warm-up: the adapters into their slots
                load(s.target, names, a.clients, a.clients, 4)
            for r in range(a.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for side in order:
                    t = servers[side].target
                    results[side]["base"].append(
                        load(t, ("",), a.clients, a.requests, a.new_tokens).output_tokens_per_s)
                    results[side]["adapters"].append(
                        load(t, names, a.clients, a.requests, a.new_tokens).output_tokens_per_s)
                print(f"round {r + 1}: " + "; ".join(
                    f"{s} base {results[s]['base'][-1]:.1f} adapters "
                    f"{results[s]['adapters'][-1]:.1f}" for s in sides) + " tok/s", flush=True)
        finally:
            for s in servers.values():
                s.stop()
            for tree in trees:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(tree)], capture_output=True)
    summary = {}
    for kind in ("base", "adapters"):
        before, after = results["before"][kind], results["after"][kind]
        summary[kind] = {"before_tokens_per_s": median(before),
                         "after_tokens_per_s": median(after),
                         "ratio_after_before": median(
            [x / y for x, y in zip(after, before, strict=True)])}
    for side in sides:
        summary[f"{side}_overhead_ratio"] = median(
            [x / y for x, y in zip(results[side]["adapters"], results[side]["base"],
                                   strict=True)])
    print_table(f"after ({a.after}) against before ({a.before}), median of {a.rounds} rounds",
                [(f"{k} {m}", v) for k, d in summary.items() if isinstance(d, dict)
                 for m, v in d.items()]
                + [(k, v) for k, v in summary.items() if not isinstance(v, dict)])
    result = {**summary, "rounds": results, "settings": vars(a) | {"out": a.out and str(a.out)}}
    path = write_results("ab-serving", result, a.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
