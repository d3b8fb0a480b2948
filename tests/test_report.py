"""tsmtrain.scaling.report: sweep directories built by hand, checked in the CSV, Markdown, rich output and plots."""

import csv
import json
import math
from dataclasses import asdict

import pytest

from tsmtrain.scaling.model import DataSpec, FileSystemSpec, LinkSpec, NetworkSpec, Prediction, ScalingBasis, predict
from tsmtrain.errors import UserError
from tsmtrain.scaling.records import BREAKDOWN, RECORD_KEYS, SweepError
from tsmtrain.scaling.report import filesystem_table, load_sweep, print_report, table_rows, write_report


def point(workers: int, mode: str = "weak", status: str = "ok", error: str | None = None,
          batch: int = 8, global_batch: int = 64) -> dict:
    """A point record as tsmtrain.scaling.sweep writes it, with consistent made-up numbers: the
    compute per step scales with the clips per rank, the allreduce wait grows with log2(workers)."""
    per_rank = batch if mode == "weak" else global_batch // workers
    record = dict(workers=workers, status=status, error=error, launch="local", nodes=1, ranks_per_node=workers,
                  global_batch=per_rank * workers, batch_per_rank=per_rank, lr=0.01, warmup_steps=None,
                  steps=None, step_time_s=None, clips_per_s=None, clips_per_s_per_rank=None, breakdown_s=None,
                  allreduce_s=None, gradient_bytes=44_700_000, parameters=11_180_000,
                  run_dir=f"/sweep/runs/workers-{workers:04d}", log=f"/sweep/runs/workers-{workers:04d}.log",
                  job_id=None, seconds=12.5)
    if status == "ok":
        breakdown = dict(data=0.004 * per_rank, augment=0.0025 * per_rank, forward_backward=0.06 * per_rank,
                         allreduce_wait=0.031 * math.log2(workers), optimizer=0.0123, other=0.0071)
        step = sum(breakdown.values())
        record.update(warmup_steps=5, steps=20, step_time_s=step, clips_per_s=per_rank * workers / step,
                      clips_per_s_per_rank=per_rank / step, breakdown_s=breakdown,
                      allreduce_s=0.04 * math.log2(workers) if workers > 1 else 0.0)
    assert tuple(record) == RECORD_KEYS  # every key, in the order the sweep writes them
    return record


def make_sweep(root, records, mode: str = "weak"):
    root.mkdir(parents=True, exist_ok=True)
    meta = dict(recipe="/abs/configs/demo.yaml", mode=mode, launch="local", steps=20, warmup_steps=5,
                batch_per_rank=8 if mode == "weak" else None, global_batch=64 if mode == "strong" else None,
                model="TSM-resnet18", num_segments=8, input_size=64, created="2026-11-22T10:00:00")
    (root / "sweep.json").write_text(json.dumps(meta, indent=1))
    (root / "points").mkdir(exist_ok=True)
    for r in records:
        (root / "points" / f"workers-{r['workers']:04d}.json").write_text(json.dumps(r, indent=1))
    return root


FAILED_ERROR = "exit status 1: RuntimeError: [rank 3] NCCL error | see train.log"  # rich markup, a pipe


def weak_sweep(tmp_path):
    return make_sweep(tmp_path / "sweep", [point(4), point(1), point(2),
                                           point(8, status="failed", error=FAILED_ERROR)])


def prediction(workers: int, efficiency: float) -> Prediction:
    """A model prediction with made-up numbers: 0.6 s of compute and data per step, the rest of
    the step an exposed allreduce."""
    step = 0.6 / efficiency
    return Prediction(workers=workers, nodes=workers // 4, global_batch=8 * workers, batch_per_rank=8.0,
                      step_time_s=step, clips_per_s=8 * workers / step, clips_per_s_per_rank=8 / step,
                      efficiency=efficiency, breakdown_s=dict(compute=0.55, data=0.05, allreduce_exposed=step - 0.6),
                      allreduce_s=0.2, limited_by="network")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(path):
    """The Markdown table of report.md as a list of {header: cell} dicts (escaped pipes restored)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-: ")
    return [dict(zip(header, (c.strip().replace("\\|", "|") for c in line.strip("|").split(" | "))))
            for line in lines[2:]]


def expected_scaling(records, base_workers):
    """speed-up and efficiency of each ok record from the formula, relative to base_workers."""
    x0 = next(r["clips_per_s"] for r in records if r["workers"] == base_workers)
    return {r["workers"]: (r["clips_per_s"] / x0 * base_workers, r["clips_per_s"] / (x0 * r["workers"] / base_workers))
            for r in records if r["status"] == "ok"}


def test_load_sweep_sorts_by_workers(tmp_path):
    meta, records = load_sweep(weak_sweep(tmp_path))
    assert meta["mode"] == "weak"
    assert [r["workers"] for r in records] == [1, 2, 4, 8]
    assert records[-1]["status"] == "failed"


def test_write_report_files_and_numbers(tmp_path):
    from matplotlib.image import imread

    sweep = weak_sweep(tmp_path)
    _, records = load_sweep(sweep)
    files = write_report(sweep)
    assert files.markdown == sweep / "report" / "report.md" and files.csv.name == "report.csv"
    for png in (files.throughput, files.efficiency, files.breakdown):
        image = imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100, png
    expected = expected_scaling(records, base_workers=1)

    rows = read_csv(files.csv)
    assert [(r["workers"], r["kind"], r["status"]) for r in rows] == [
        ("1", "measured", "ok"), ("2", "measured", "ok"), ("4", "measured", "ok"), ("8", "measured", "failed")]
    for row, rec in zip(rows, records):
        assert int(row["global_batch"]) == rec["global_batch"]
        assert int(row["batch_per_rank"]) == rec["batch_per_rank"]
        if rec["status"] != "ok":
            continue
        assert float(row["clips_per_s"]) == pytest.approx(rec["clips_per_s"], rel=1e-9)
        assert float(row["clips_per_s_per_rank"]) == pytest.approx(rec["clips_per_s_per_rank"], rel=1e-9)
        assert float(row["step_time_s"]) == pytest.approx(rec["step_time_s"], rel=1e-9)
        for k in BREAKDOWN:
            assert float(row[f"{k}_s"]) == pytest.approx(rec["breakdown_s"][k], rel=1e-9), k
        speedup, efficiency = expected[rec["workers"]]
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-9)
        assert float(row["efficiency"]) == pytest.approx(efficiency, rel=1e-9)
    assert float(rows[0]["speedup"]) == pytest.approx(1.0) and float(rows[0]["efficiency"]) == pytest.approx(1.0)
    assert expected[4][1] < 0.95  # the made-up allreduce wait really costs efficiency

    failed = rows[3]
    assert failed["error"] == FAILED_ERROR
    assert failed["clips_per_s"] == failed["speedup"] == failed["efficiency"] == failed["data_s"] == ""

    text = files.markdown.read_text()
    assert "demo.yaml" in text and "weak" in text and "20" in text and "5 warm-up" in text
    table = markdown_table(files.markdown)
    assert [t["workers"] for t in table] == ["1", "2", "4", "8"]
    for cells, rec in zip(table, records):
        assert cells["global batch"] == str(rec["global_batch"])
        if rec["status"] != "ok":
            continue
        assert float(cells["clips/s"]) == pytest.approx(rec["clips_per_s"], rel=1e-3)
        assert float(cells["forward+backward (ms/step)"]) / 1000 == pytest.approx(
            rec["breakdown_s"]["forward_backward"], rel=1e-3)
        assert float(cells["allreduce wait (ms/step)"]) / 1000 == pytest.approx(
            rec["breakdown_s"]["allreduce_wait"], rel=1e-3, abs=1e-6)
        speedup, efficiency = expected[rec["workers"]]
        assert float(cells["speedup"]) == pytest.approx(speedup, rel=1e-3)
        assert float(cells["efficiency"].rstrip("%")) == pytest.approx(100 * efficiency, abs=0.05)
    assert table[3]["status"] == "failed" and table[3]["error"] == FAILED_ERROR and table[3]["clips/s"] == ""


def test_baseline_is_smallest_ok_point(tmp_path):
    """With the 1-worker point failed, N0 = 2: speed-up 2 and efficiency 1 there."""
    records = [point(1, status="failed", error="exit status 137: killed"), point(2), point(4), point(16)]
    sweep = make_sweep(tmp_path / "s", records)
    rows = table_rows(*load_sweep(sweep))
    expected = expected_scaling(records, base_workers=2)
    assert rows[0]["status"] == "failed" and rows[0]["speedup"] is None
    assert rows[1]["speedup"] == pytest.approx(2.0) and rows[1]["efficiency"] == pytest.approx(1.0)
    for row in rows[1:]:
        assert (row["speedup"], row["efficiency"]) == pytest.approx(expected[row["workers"]], rel=1e-12)


def test_strong_scaling_speedup_is_step_time_ratio(tmp_path):
    records = [point(n, mode="strong") for n in (1, 2, 4, 8)]
    sweep = make_sweep(tmp_path / "s", records, mode="strong")
    rows = table_rows(*load_sweep(sweep))
    assert {r["global_batch"] for r in rows} == {64}
    t1 = records[0]["step_time_s"]
    for row, rec in zip(rows, records):
        assert row["speedup"] == pytest.approx(t1 / rec["step_time_s"], rel=1e-12)
        assert row["efficiency"] == pytest.approx(t1 / (rec["step_time_s"] * rec["workers"]), rel=1e-12)
    files = write_report(sweep)
    assert "strong" in files.markdown.read_text().splitlines()[0]


def test_predicted_rows(tmp_path):
    from matplotlib.image import imread

    sweep = weak_sweep(tmp_path)
    predictions = [asdict(prediction(64, 0.71)), asdict(prediction(16, 0.83))]  # as tsmtrain report passes them
    files = write_report(sweep, predictions)
    rows = read_csv(files.csv)
    predicted = [r for r in rows if r["kind"] == "predicted"]
    assert [r["workers"] for r in predicted] == ["16", "64"]
    base = rows[0]  # the 1-worker point: predicted rows are measured against it too
    assert base["kind"] == "measured" and base["status"] == "ok"
    base_rate, base_workers = float(base["clips_per_s"]), int(base["workers"])
    for row, p in zip(predicted, sorted(predictions, key=lambda p: p["workers"])):
        assert row["status"] == "predicted" and row["limited_by"] == "network"
        ideal = base_rate * p["workers"] / base_workers
        assert float(row["efficiency"]) == pytest.approx(p["clips_per_s"] / ideal, rel=1e-9)
        assert float(row["speedup"]) == pytest.approx(p["clips_per_s"] / ideal * p["workers"], rel=1e-9)
        assert float(row["model_efficiency"]) == pytest.approx(p["efficiency"], rel=1e-9)
        assert float(row["clips_per_s"]) == pytest.approx(p["clips_per_s"], rel=1e-9)
        assert float(row["compute_s"]) == pytest.approx(0.55)
        assert float(row["allreduce_exposed_s"]) == pytest.approx(p["breakdown_s"]["allreduce_exposed"], rel=1e-9)
        assert row["forward_backward_s"] == ""
    assert [r["kind"] for r in rows[:4]] == ["measured"] * 4

    table = markdown_table(files.markdown)
    assert [(t["kind"], t["workers"]) for t in table[-2:]] == [("*predicted*", "16"), ("*predicted*", "64")]
    assert all(t["kind"] == "measured" for t in table[:4])
    for png in (files.throughput, files.efficiency, files.breakdown):
        assert imread(png).shape[0] > 100

    # Prediction dataclasses are accepted as they are, and give the rows their asdict gives
    as_objects = table_rows(*load_sweep(sweep), [prediction(16, 0.83)])
    assert as_objects[-1]["kind"] == "predicted" and as_objects[-1]["model_efficiency"] == pytest.approx(0.83)
    assert as_objects == table_rows(*load_sweep(sweep), [asdict(prediction(16, 0.83))])
    # without a measured baseline a prediction keeps the model's own efficiency
    alone = table_rows(load_sweep(sweep)[0], [], [prediction(16, 0.83)])
    assert alone[0]["efficiency"] == pytest.approx(0.83) and alone[0]["speedup"] == pytest.approx(16 * 0.83)


def test_print_report_shows_workers_and_failure(tmp_path):
    from rich.console import Console

    meta, records = load_sweep(weak_sweep(tmp_path))
    console = Console(record=True, width=260)
    print_report(meta, table_rows(meta, records, [prediction(32, 0.8)]), console=console)
    text = console.export_text()
    lines = text.splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.count("│") > 3]
    rows = []  # the table's rows, with the text of wrapped cells joined
    for line in cells:
        if line[0] or not rows:
            rows.append(line)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], line)]
    assert [(r[0], r[4]) for r in rows] == [("1", "ok"), ("2", "ok"), ("4", "ok"), ("8", "failed"),
                                            ("32", "predicted")]
    assert rows[3][-1] == FAILED_ERROR
    assert "TSM-resnet18" in text and "weak" in text


def test_submitted_and_all_failed_points_are_kept(tmp_path):
    from matplotlib.image import imread

    records = [point(1, status="failed", error="exit status 1: out of memory"),
               point(2, status="submitted")]
    files = write_report(make_sweep(tmp_path / "s", records))
    rows = read_csv(files.csv)
    assert [(r["workers"], r["status"]) for r in rows] == [("1", "failed"), ("2", "submitted")]
    assert rows[0]["error"] == "exit status 1: out of memory"
    assert "| submitted |" in files.markdown.read_text()
    assert imread(files.breakdown).shape[1] > 100


def test_sweep_errors(tmp_path):
    with pytest.raises(SweepError, match="not a sweep directory: .*nowhere"):
        load_sweep(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepError, match="not a sweep directory: .*empty.*sweep.json"):
        write_report(tmp_path / "empty")

    sweep = weak_sweep(tmp_path)
    bad = sweep / "points" / "workers-0002.json"
    bad.write_text('{\n "workers": 2,\n "status": "ok",,\n}\n')
    with pytest.raises(SweepError, match=r"workers-0002\.json:3: not valid JSON .*; remove the file"):
        load_sweep(sweep)

    record = point(2)
    del record["clips_per_s"]
    bad.write_text(json.dumps(record))
    with pytest.raises(SweepError, match=r"workers-0002\.json: missing key\(s\) clips_per_s"):
        load_sweep(sweep)

    bad.write_text(json.dumps(point(2)))
    (sweep / "sweep.json").write_text('{"recipe": "x.yaml", "mode": "weak"\n')
    with pytest.raises(SweepError, match=r"sweep\.json:\d+: not valid JSON"):
        load_sweep(sweep)
    assert issubclass(SweepError, UserError)  # the CLI catches the one base


def test_one_record_schema(tmp_path):
    """The reader's checks come from tsmtrain.scaling.records: an unknown status, an ok point
    without a measured value or a phase, and two files of one worker count are refused."""
    sweep = weak_sweep(tmp_path)
    bad = sweep / "points" / "workers-0002.json"
    bad.write_text(json.dumps(point(2, status="running")))
    with pytest.raises(SweepError, match=r"workers-0002\.json: status 'running' is not one of ok, failed, submitted"):
        load_sweep(sweep)
    record = point(2)
    record["step_time_s"] = None
    del record["breakdown_s"]["allreduce_wait"]
    bad.write_text(json.dumps(record))
    with pytest.raises(SweepError, match=r"status ok but no value for step_time_s, breakdown_s\.allreduce_wait$"):
        load_sweep(sweep)
    bad.write_text(json.dumps(point(2, status="failed", error="exit status 1")))  # a failed point needs no values
    assert load_sweep(sweep)[1][1]["status"] == "failed"
    (sweep / "points" / "workers-0099.json").write_text(json.dumps(point(4)))
    with pytest.raises(SweepError, match=r"workers-0099\.json: workers = 4 again \(also in .*workers-0004\.json\)"):
        load_sweep(sweep)
    (sweep / "points" / "workers-0099.json").write_text("[1, 2]")
    with pytest.raises(SweepError, match=r"workers-0099\.json: expected a JSON object, found list"):
        load_sweep(sweep)


def test_write_json_is_atomic(tmp_path):
    from tsmtrain.io import write_json
    from tsmtrain.scaling.records import read_json

    path = tmp_path / "sub" / "doc.json"
    write_json(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # JSON cannot hold it: the old file stays, no temporary is left
    assert read_json(path) == {"a": 1} and sorted(p.name for p in path.parent.iterdir()) == ["doc.json"]
    with pytest.raises(SweepError, match=r"missing\.json: cannot be read \(No such file"):
        read_json(tmp_path / "missing.json")


# --------------------------------------------------------------------------- the file-system table

FS_NET = NetworkSpec(name="fs", ranks_per_node=4, intra_node=LinkSpec(bandwidth_gb_per_s=100, latency_us=0),
                     inter_node=LinkSpec(bandwidth_gb_per_s=10, latency_us=0),
                     filesystem=FileSystemSpec(opens_per_s=500))
FS_BASIS = ScalingBasis(compute_s_per_clip=0.1, forward_backward_s_per_clip=0.075, data_s_per_step=0.0,
                        overlap_fraction=0.0, gradient_bytes=0.0, mode="weak", batch_per_rank=8)


def test_filesystem_table_in_report_and_terminal(tmp_path):
    from rich.console import Console

    data = DataSpec(videos=12_000, epochs=3, video_bytes=500_000, shard_bytes=100_000_000, workers_per_rank=4)
    by_layout = {layout: predict(FS_BASIS, FS_NET, [4, 96], DataSpec(**{**asdict(data), "layout": layout}))
                 for layout in ("files", "shards")}
    table = filesystem_table(data, by_layout)
    assert [(r["workers"], r["layout"]) for r in table.rows] == [(4, "files"), (4, "shards"), (96, "files"),
                                                                (96, "shards")]
    # 4 ranks: 40 clips/s, within 500 opens/s; 96 ranks want 960 clips/s, one open each: capped at 500
    files96 = table.rows[2]
    assert files96["limited_by"] == "filesystem" and files96["clips_per_s"] == pytest.approx(500)
    assert files96["opens_per_s"] == pytest.approx(500) and files96["read_gb_per_s"] == pytest.approx(0.25)
    assert table.rows[0]["limited_by"] == "compute" and table.rows[0]["epoch_s"] == pytest.approx(12_000 / 40)
    assert "12,000 videos x 3 epochs" in table.caption and "shards: 60 of" in table.caption
    # asdict'ed predictions, as tsmtrain report passes them, give the same rows
    assert filesystem_table(data, {k: [asdict(p) for p in v] for k, v in by_layout.items()}).rows == table.rows

    sweep = weak_sweep(tmp_path)
    files = write_report(sweep, by_layout["files"], table)
    text = files.markdown.read_text()
    section = text[text.index("## File system"):]
    assert table.caption in section and "| 96 | files | 500 | 24 | 500 | 500 | 0.25 | filesystem |" in section
    assert read_csv(files.csv)[-1]["limited_by"] == "filesystem"
    console = Console(record=True, width=200)
    meta, records = load_sweep(sweep)
    print_report(meta, table_rows(meta, records, by_layout["files"]), console=console, filesystem=table)
    out = console.export_text()
    assert "File system" in out and "opens/s (run mean)" in out and out.count("shards") >= 2


def test_report_command_data_options(tmp_path):
    from typer.testing import CliRunner

    from tsmtrain.cli import app

    sweep = weak_sweep(tmp_path)
    net = tmp_path / "net.yaml"
    net.write_text("name: t\nranks_per_node: 4\nintra_node: {bandwidth_gb_per_s: 100, latency_us: 1}\n"
                   "inter_node: {bandwidth_gb_per_s: 10, latency_us: 2}\nfilesystem: {opens_per_s: 50}\n")

    def report(*args):
        return CliRunner().invoke(app, ["report", str(sweep), *map(str, args)], prog_name="tsmtrain")

    done = report("--predict", "8,64", "--network", net, "--videos", 1000, "--epochs", 2, "--video-bytes", 1e5,
                  "--layout", "shards", "--shard-size", "10MiB", "--sidecar-reads", 1, "--workers-per-rank", 2)
    assert done.exit_code == 0, done.output
    text = (sweep / "report" / "report.md").read_text()
    assert "1,000 videos x 2 epochs, 100,000 bytes per video, 2 loader workers per rank" in text
    assert "files: 2 opens (video and frame table) per clip" in text and "shards: 10 of" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 8 |", "| 64 |"))]
    assert [r.split(" | ")[1] for r in rows] == ["files", "shards", "files", "shards"]
    # files, 2 opens per clip: capped at 25 clips/s. 10 shards: 16 workers at 8 ranks draw 62.5 clips an
    # epoch and open 0.16 shards per clip (312 clips/s allowed, more than 8 ranks compute); 128 at 64 ranks, 0.72
    assert [r.rsplit(" | ", 1)[1] for r in rows] == ["filesystem |", "compute |", "filesystem |", "filesystem |"]
    assert [r["limited_by"] for r in read_csv(sweep / "report" / "report.csv")[-2:]] == ["compute", "filesystem"]
    for args, message in {("--videos", 10): "--videos, --epochs",
                          ("--predict", 8, "--network", net, "--layout", "tar"): "--layout 'tar'",
                          ("--predict", 8, "--network", net, "--shard-size", "lots"): "--shard-size 'lots'"}.items():
        failed = report(*args)
        assert failed.exit_code == 2 and message in failed.stderr, (args, failed.output)
        assert "Traceback" not in failed.output
