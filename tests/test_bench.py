"""tsmtrain bench step: runs on a recipe whose data files are absent, prints and writes its figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tsmtrain.bench.step import Variant, available_variants, parse_variants

REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "absent"), "train_list": str(tmp_path / "absent.txt"), "num_segments": 2,
                 "input_size": 16},
        "model": {"arch": "resnet18", "num_classes": 4, "pretrained": str(tmp_path / "absent.pth")},
        "train": {"batch_size": 1, "threads": 1}}))
    return path


def test_variants_on_the_cpu_and_their_names():
    names = [v.name for v in available_variants(torch.device("cpu"))]
    assert names == ["fp32", "bf16", "fp32+channels_last", "bf16+channels_last", "fp32+compile"]
    assert parse_variants("fp32, bf16+channels_last,fp32", torch.device("cpu")) == [
        Variant(), Variant("bf16", channels_last=True)]
    with pytest.raises(ValueError, match="'fp64' is not a variant; on cpu they are: fp32, bf16"):
        parse_variants("fp64", torch.device("cpu"))


@pytest.mark.slow
def test_bench_step_prints_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tsmtrain", "bench", "step", str(recipe(tmp_path)), "--variants",
                           "fp32+channels_last", "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "device cpu" in text and "1 threads" in text and f"torch {torch.__version__}" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("fp32 ", "fp32+channels_last "))]
    assert [r[0] for r in rows] == ["fp32", "fp32+channels_last"]  # fp32 (the reference) is always timed
    assert all(float(r[4]) > 0 for r in rows)  # TSM/TSN
    shift_rows = [line.split()[:2] for line in text.splitlines() if line.startswith(("contiguous ", "channels_last "))]
    assert shift_rows == [["contiguous", "first"], ["contiguous", "network"], ["channels_last", "first"],
                          ["channels_last", "network"]]
    result = json.loads(out.read_text())
    assert result["input"]["shape"] == [1, 2, 3, 16, 16]
    assert len(result["shift"]["shapes"]) == 8 and result["shift"]["shapes"][0] == [2, 64, 4, 4]  # ResNet-18: 8 blocks
    for row in result["variants"]:
        assert row["rounds"] == 1 and row["tsm_s"] > 0 and row["tsn_s"] > 0
        q1, q3 = row["tsm_over_tsn_quartiles"]
        assert q1 == q3 == row["tsm_over_tsn"]  # one round: its ratio is every quartile
    # the A/A twin runs in the fp32 rounds only, and the report prints its ratio
    twin = {row["name"]: row.get("ref_over_twin") for row in result["variants"]}
    assert twin["fp32"] > 0 and twin["fp32+channels_last"] is None
    assert f"noise floor (A/A): fp32 TSN against an identical fp32 TSN, timed in the same rounds: median " \
           f"{twin['fp32']:.3f}" in text


def test_bench_step_refuses_an_unknown_variant(tmp_path):
    proc = run_cli("bench", "step", recipe(tmp_path), "--variants", "fp32,int8")  # in this process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --variants: 'int8' is not a variant")


# ---- bench allreduce


def test_bus_bandwidth_follows_nccl_tests():
    from tsmtrain.scaling.model import bus_bandwidth

    assert bus_bandwidth(1e9 / 2.0, 4) == pytest.approx(5e8 * 2 * 3 / 4)
    assert bus_bandwidth(1e6, 1) == 0.0  # one rank sends nothing


def test_allreduce_sizes_on_one_process():
    from tsmtrain.bench.allreduce import allreduce_sizes, format_allreduce_row
    from tsmtrain.dist.base import LocalEngine

    lines = []
    rows = allreduce_sizes(LocalEngine(), [1000, 4096], repeats=2, warmup=0, say=lines.append)
    assert [r["bytes"] for r in rows] == [1000, 4096] and [r["count"] for r in rows] == [250, 1024]
    assert all(r["seconds"] > 0 and r["min_s"] <= r["seconds"] <= r["max_s"] and r["busbw_gb_per_s"] == 0
               for r in rows)
    assert lines == [format_allreduce_row(r) for r in rows]


@pytest.mark.slow
def test_bench_allreduce_on_two_ranks_reports_bus_bandwidth(tmp_path):
    out = tmp_path / "ar.json"
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
                           sys.executable, "-m", "tsmtrain", "bench", "allreduce", "--engine", "ddp",
                           "--sizes", "64KB,1MB", "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "# allreduce: 2 ranks (ddp) on 1 host(s)" in done.stdout and "busbw" in done.stdout
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and [r["bytes"] for r in record["rows"]] == [64000, 1000000]
    for row in record["rows"]:  # busbw = algbw x 2(n-1)/n = algbw for two ranks
        assert row["algbw_gb_per_s"] > 0 and row["busbw_gb_per_s"] == pytest.approx(row["algbw_gb_per_s"])


def test_bench_allreduce_refuses_bad_sizes_and_engines():
    proc = run_cli("bench", "allreduce", "--sizes", "1MB,lots")
    assert proc.returncode == 2 and "--sizes" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "allreduce", "--engine", "none")
    assert proc.returncode == 2 and "--engine: 'none'" in proc.stderr
