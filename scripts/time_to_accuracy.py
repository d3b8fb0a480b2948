"""Time to accuracy of finished runs, from their ``train.log``: validation top-1 after each epoch,
with the seconds since the run started, and when each run first reached a target top-1.

    python scripts/time_to_accuracy.py runs/demo runs/demo-multigrid --target 98
    python scripts/time_to_accuracy.py BASELINE_RUN OTHER_RUN ... --target 98 --json out.json

The first run directory is the baseline: every run's time to the target is also given as a
fraction of the baseline's whole wall time (the multigrid acceptance: at most 0.5x). Times are
read from the log's timestamps (rank 0's ``train.log``, to the millisecond). A run starts at its
first log line, so the seconds exclude Python's start and imports (the same few seconds for
every run) and include everything after: dataset checks, training, evaluation, checkpoints. A
run ends at its last line. For a run that was stopped and resumed, the seconds include the time
between its processes.

Prints a Markdown table. Exit status 2 with one line for a folder without a ``train.log`` or
without any evaluation in it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
EVAL = re.compile(r"epoch (\d+) validation: top-1 ([0-9.]+)%")


def read_run(run_dir: Path) -> dict:
    """The evaluations of ``run_dir/train.log``: ``{"epochs": [(epoch, top-1 %, seconds), ...],
    "wall_s": seconds}``, the seconds since the log's first line.

    Raises:
        SystemExit: no ``train.log``, or no evaluation in it (one line, status 2).
    """
    log = run_dir / "train.log"
    if not log.is_file():
        sys.exit(f"{run_dir}: no train.log (not a run directory)")
    evals, elapsed, start = [], 0.0, None
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        start = t if start is None else start
        elapsed = t - start
        e = EVAL.search(line)
        if e:
            evals.append((int(e.group(1)), float(e.group(2)), round(elapsed, 1)))
    if not evals:
        sys.exit(f"{log}: no validation line (was the run evaluated?)")
    return {"epochs": evals, "wall_s": round(elapsed, 1)}


def first_reaching(epochs: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """``(epoch, seconds)`` of the first evaluation at or above ``target`` percent, or None."""
    return next(((e, s) for e, top1, s in epochs if top1 >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the baseline")
    p.add_argument("--target", type=float, default=98.0, help="top-1 in percent (default 98)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    runs = {str(r): read_run(r) for r in args.runs}
    base_wall = runs[str(args.runs[0])]["wall_s"]
    print(f"| run | top-1 by epoch (s since start) | final top-1 | wall s (x baseline) | first >= {args.target:g}% |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        curve = ", ".join(f"{top1:.1f} ({s:.0f})" for _, top1, s in r["epochs"])
        hit = first_reaching(r["epochs"], args.target)
        r["target"] = args.target
        r["reached"] = None if hit is None else {"epoch": hit[0], "s": hit[1], "x_baseline_wall": hit[1] / base_wall}
        reached = "not reached" if hit is None else f"epoch {hit[0]}, {hit[1]:.0f} s ({hit[1] / base_wall:.2f}x)"
        print(f"| {name} | {curve} | {r['epochs'][-1][1]:.1f}% | {r['wall_s']:.0f} "
              f"({r['wall_s'] / base_wall:.2f}x) | {reached} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
