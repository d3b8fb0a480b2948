"""The local SGD table of run directories: per run and epoch, the validation top-1, the training
seconds of the epoch (the sum of its logging intervals' step times, evaluation left out) and the
mean bytes allreduced per optimizer step (``allreduce_bytes_per_step`` of metrics.jsonl).

usage: python scripts/local_sgd_table.py RUN_DIR ...   (e.g. runs/demo-sync runs/demo-h4)

Prints a Markdown table; reads nothing but each run's metrics.jsonl and recipe.yaml. The first
epoch's seconds include the first step's start-up (loader workers, first allocations).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def summary(run_dir: Path) -> tuple[str, list[tuple[int, float | None, float]], float]:
    """``(label, [(epoch, top1, train seconds)], mean bytes per step)`` of one run directory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dist = yaml.safe_load((run_dir / "recipe.yaml").read_text()).get("dist", {})
    label = ("allreduce" if dist.get("sync", "allreduce") == "allreduce" else
             f"local_sgd H={dist.get('local_sgd_period')} start={dist.get('local_sgd_start')}")
    seconds: dict[int, float] = {}
    top1: dict[int, float] = {}
    sent, steps = 0.0, 0
    for r in records:
        if "val_top1" in r:
            top1[r["epoch"]] = r["val_top1"]
        elif "step_time_s" in r:
            seconds[r["epoch"]] = seconds.get(r["epoch"], 0.0) + r["step_time_s"] * r["interval_steps"]
            sent += r.get("allreduce_bytes_per_step", 0.0) * r["interval_steps"]
            steps += r["interval_steps"]
    rows = [(e, top1.get(e), seconds[e]) for e in sorted(seconds)]
    return label, rows, sent / max(steps, 1)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    print("| run | sync | epoch | val top-1 % | train s (cumulative) | MB allreduced per step (run mean) |")
    print("|---|---|---|---|---|---|")
    for name in argv:
        label, rows, per_step = summary(Path(name))
        total = 0.0
        for epoch, top1, secs in rows:
            total += secs
            shown = "" if top1 is None else f"{top1:.1f}"
            print(f"| {Path(name).name} | {label} | {epoch} | {shown} | {secs:.1f} ({total:.1f}) | {per_step / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
