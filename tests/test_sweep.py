"""Scaling sweeps: planning, the measured record of a point, and a real local sweep at 1 and 2
workers (extended by a point that fails) with its report."""

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import tiny_recipe, venv_env
from tsmtrain.recipe import load_recipe
from tsmtrain.scaling.records import BREAKDOWN, SweepError, point_path
from tsmtrain.scaling.sweep import measure_point, parse_workers, plan_sweep


def test_parse_workers():
    assert parse_workers("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "1,0", "1,two", "-2"):
        with pytest.raises(SweepError, match="--workers"):
            parse_workers(bad)
    with pytest.raises(SweepError, match="--predict: 'x'"):
        parse_workers("x", "--predict")


def _interval(step, steps, step_time, clips_per_step, workers, phases):
    return {"step": step, "loss": 1.0, "interval_steps": steps, "step_time_s": step_time,
            "clips_per_s": clips_per_step / step_time, "clips_per_s_per_rank": clips_per_step / step_time / workers,
            "breakdown_s": dict(zip(BREAKDOWN, phases))}


def test_measure_point_counts_only_steps_after_the_warmup(tmp_path):
    rows = [
        _interval(2, 2, 9.0, 16, 2, (5, 1, 1, 1, 1, 0)),       # warm-up: slow, must not count
        _interval(4, 2, 1.0, 16, 2, (0.1, 0.1, 0.5, 0.2, 0.1, 0.0)),
        _interval(5, 1, 2.0, 16, 2, (0.2, 0.1, 1.0, 0.5, 0.2, 0.0)),
        {"step": 5, "allreduce_benchmark": {"seconds": 0.3, "bytes": 400, "parameters": 100}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = measure_point(tmp_path, warmup=2, steps=3)
    # 3 measured steps in 1.0*2 + 2.0*1 = 4 s, 48 clips
    assert m["step_time_s"] == pytest.approx(4 / 3)
    assert m["clips_per_s"] == pytest.approx(48 / 4) and m["clips_per_s_per_rank"] == pytest.approx(24 / 4)
    assert m["breakdown_s"]["forward_backward"] == pytest.approx((0.5 * 2 + 1.0) / 3)
    assert m["breakdown_s"]["allreduce_wait"] == pytest.approx((0.2 * 2 + 0.5) / 3)
    assert (m["allreduce_s"], m["gradient_bytes"], m["parameters"]) == (0.3, 400, 100)
    with pytest.raises(SweepError, match="1 of 3 measured steps"):  # the interval of steps 3-4 began in the warm-up
        measure_point(tmp_path, warmup=3, steps=3)


def test_plan_refuses_what_cannot_run(tmp_path, tiny_demo):
    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "r", train={"batch_size": 2}))
    with pytest.raises(SweepError, match="--workers 3: a global batch of 8 clips does not divide"):
        plan_sweep(cfg, "r.yaml", [1, 3], strong=True, global_batch=8, videos=24)
    with pytest.raises(SweepError, match="--global-batch is for strong scaling"):
        plan_sweep(cfg, "r.yaml", [1], global_batch=8, videos=24)
    plan = plan_sweep(cfg, "r.yaml", [1, 2, 4], strong=True, global_batch=8, videos=24)
    assert {n: r.train.batch_size for n, r in plan.recipes.items()} == {1: 8, 2: 4, 4: 2}
    one = plan.recipes[2]
    assert (one.dist.np, one.data.val_list, one.train.stop_after_steps, one.train.allreduce_benchmark) == (2, None, 25, 5)
    assert 20 % one.train.log_every == 0 and 5 % one.train.log_every == 0  # a record at the warm-up's end
    assert one.schedule.epochs * 24 // 8 >= 25  # enough epochs (24 clips / 8 per step) for the steps
    weak = plan_sweep(cfg, "r.yaml", [1, 2], videos=24)
    assert [r.train.batch_size for r in weak.recipes.values()] == [2, 2]
    assert weak.sweep_dir == tmp_path / "runs" / "sweeps" / "r-weak"
    with pytest.raises(SweepError, match="--workers 3: more ranks than one node's 2"):
        plan_sweep(load_recipe(tmp_path / "r.yaml", ["cluster.tasks_per_node=2"]), "r.yaml", [1, 3], launch="submit",
                   videos=24)
    nodes = plan_sweep(load_recipe(tmp_path / "r.yaml", ["cluster.tasks_per_node=2"]), "r.yaml", [1, 4],
                       launch="submit", videos=24).recipes
    assert [(r.cluster.nodes, r.cluster.tasks_per_node) for r in nodes.values()] == [(1, 1), (2, 2)]


def test_extending_with_other_settings_is_refused(tmp_path, tiny_demo):
    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "r"))
    plan = plan_sweep(cfg, "r.yaml", [1], steps=4, videos=24)
    plan.sweep_dir.mkdir(parents=True)
    (plan.sweep_dir / "sweep.json").write_text(json.dumps(plan.meta))
    with pytest.raises(SweepError, match="steps = 4, this call gives 6"):
        plan_sweep(cfg, "r.yaml", [2], steps=6, videos=24)
    other = load_recipe(tmp_path / "r.yaml", ["model.shift_div=4"])
    with pytest.raises(SweepError, match=r"digest .*recipe"):
        plan_sweep(other, "r.yaml", [2], steps=4, videos=24)
    point_path(plan.sweep_dir, 1).parent.mkdir()
    point_path(plan.sweep_dir, 1).write_text("{not json")
    with pytest.raises(SweepError, match=r"workers-0001.json:1: not valid JSON"):
        plan_sweep(cfg, "r.yaml", [1], steps=4, videos=24)


def tsmtrain(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tsmtrain", *map(str, args)], capture_output=True, text=True,
                          env=venv_env(), cwd=cwd)


@pytest.mark.slow
@pytest.mark.horovod
def test_local_sweep_then_extend_with_a_failing_point_and_report(tmp_path, tiny_demo):
    # 24 training clips, 12 per rank: 1 and 2 ranks run; 3 ranks have no full batch and fail
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_demo, "tiny", train={"batch_size": 12})
    sweep_dir = tmp_path / "sweep"
    done = tsmtrain("sweep", recipe, "--workers", "1,2", "--steps", 2, "--warmup", 1, "--out", sweep_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first = {n: json.loads(point_path(sweep_dir, n).read_text()) for n in (1, 2)}
    for n, r in first.items():
        assert r["status"] == "ok" and r["workers"] == n and r["global_batch"] == 12 * n
        assert r["lr"] == pytest.approx(0.05 * 12 * n / 4)  # linear scaling rule, base_batch 4
        assert sum(r["breakdown_s"].values()) == pytest.approx(r["step_time_s"], rel=1e-6)
        assert r["clips_per_s"] == pytest.approx(12 * n / r["step_time_s"], rel=1e-6)
        assert r["gradient_bytes"] == 4 * r["parameters"] and r["allreduce_s"] > 0
    assert first[1]["breakdown_s"]["allreduce_wait"] < first[2]["breakdown_s"]["allreduce_wait"] + 1e-3

    done = tsmtrain("sweep", recipe, "--workers", "1,2,3", "--steps", 2, "--warmup", 1, "--out", sweep_dir,
                    cwd=tmp_path)
    assert done.returncode == 1 and "kept from earlier: workers 1, 2" in done.stderr
    assert {n: json.loads(point_path(sweep_dir, n).read_text()) for n in (1, 2)} == first  # untouched
    failed = json.loads(point_path(sweep_dir, 3).read_text())
    assert failed["status"] == "failed" and "no full global batch of 36 clips" in failed["error"]
    assert failed["clips_per_s"] is None

    done = tsmtrain("report", sweep_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report_dir = sweep_dir / "report"
    rows = list(csv.DictReader((report_dir / "report.csv").open()))
    assert [int(r["workers"]) for r in rows] == [1, 2, 3]
    for row in rows[:2]:
        record = first[int(row["workers"])]
        assert float(row["clips_per_s"]) == pytest.approx(record["clips_per_s"], rel=1e-4)
        assert int(row["global_batch"]) == record["global_batch"]
    assert float(rows[1]["efficiency"]) == pytest.approx(
        first[2]["clips_per_s"] / (2 * first[1]["clips_per_s"]), rel=1e-3)
    assert rows[2]["status"] == "failed"
    markdown = (report_dir / "report.md").read_text()
    assert "failed" in markdown and "no full global batch" in markdown
    assert f"| {first[2]['clips_per_s']:.4g} |" in markdown  # 4 significant digits
    from matplotlib.image import imread

    for name in ("throughput.png", "efficiency.png", "breakdown.png"):
        image = imread(report_dir / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert "failed" in done.stdout

    # the scaling model from the measured points, on a described network
    net = tmp_path / "net.yaml"
    net.write_text("name: test\nranks_per_node: 2\nintra_node: {bandwidth_gb_per_s: 10, latency_us: 5}\n"
                   "inter_node: {bandwidth_gb_per_s: 1, latency_us: 20}\n")
    done = tsmtrain("report", sweep_dir, "--predict", "8,64", "--network", net, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: overlap fraction" in done.stderr
    rows = list(csv.DictReader((report_dir / "report.csv").open()))
    predicted = [r for r in rows if r["kind"] == "predicted"]
    assert [int(r["workers"]) for r in predicted] == [8, 64] and len(rows) == 5
    # 1 GB/s between nodes: the 64-rank allreduce of the gradients takes at least 2*63/64 of them
    nbytes = first[2]["gradient_bytes"]
    assert float(predicted[1]["allreduce_s"]) >= 2 * 31 / 32 * nbytes / 1e9
    assert float(predicted[1]["step_time_s"]) > float(predicted[0]["step_time_s"])
    net.write_text("name: test\nranks_per_node: 2\nintra_node: {bandwidth_gb_per_s: -1, latency_us: 5}\n")
    done = tsmtrain("report", sweep_dir, "--predict", "8", "--network", net, cwd=tmp_path)
    assert done.returncode == 2 and "net.yaml:3: intra_node.bandwidth_gb_per_s" in done.stderr
    assert "Traceback" not in done.stderr
