"""scripts/time_to_accuracy.py: top-1 by epoch with the seconds since the run's first log line, and
the first evaluation at the target, as a fraction of the baseline's wall time."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "time_to_accuracy.py"


def _log(run_dir: Path, lines: list[tuple[str, str]]) -> Path:
    run_dir.mkdir()
    (run_dir / "train.log").write_text("".join(f"2026-12-06 10:{t},000 INFO {text}\n" for t, text in lines))
    return run_dir


def test_times_and_first_epoch_at_the_target(tmp_path):
    base = _log(tmp_path / "plain", [("00:00", "run x: TSM"), ("00:40", "epoch 0 validation: top-1 80.00%, top-5"),
                                     ("01:17", "epoch 1 validation: top-1 98.00%, top-5"),
                                     ("02:00", "epoch 2 validation: top-1 100.00%, top-5"), ("02:00", "done")])
    fast = _log(tmp_path / "mg", [("00:05", "preparing"), ("00:15", "epoch 0 validation: top-1 97.99%, top-5"),
                                  ("00:50", "epoch 1 validation: top-1 99.50%, top-5"), ("01:05", "final")])
    out = tmp_path / "t.json"
    done = subprocess.run([sys.executable, SCRIPT, base, fast, "--json", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures[str(base)]["wall_s"] == 120 and figures[str(fast)]["wall_s"] == 60
    assert figures[str(base)]["epochs"] == [[0, 80.0, 40.0], [1, 98.0, 77.0], [2, 100.0, 120.0]]
    assert figures[str(fast)]["reached"] == {"epoch": 1, "s": 45.0, "x_baseline_wall": 0.375}
    assert "| 98.0 (10), 99.5 (45) |" in done.stdout  # 97.99 shows as 98.0 but is below the target
    assert "epoch 1, 45 s (0.38x)" in done.stdout and "60 (0.50x)" in done.stdout


def test_a_folder_without_evaluations_is_one_line(tmp_path):
    empty = _log(tmp_path / "r", [("00:00", "run x: TSM")])
    done = subprocess.run([sys.executable, SCRIPT, empty], capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "no validation line" in done.stderr
