"""tsmtrain doctor: the readiness table and its JSON record; every GPU row skipped on a machine
without CUDA, the CPU loader measured; exit 1 when the recipe needs what is missing, 2 for a bad
recipe; the allreduce's processes and its bus bandwidth (nccl-tests' definition)."""

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tsmtrain.cli import app
from tsmtrain.bench.doctor import FIGURES, NO_CUDA, allreduce_bandwidth, loader_clips_per_s, step_figures
from tsmtrain.scaling.model import bus_bandwidth

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
GPU_ROWS = {"CUDA available", "NVIDIA driver", "GPUs", "NCCL (torch)", "GPU decoding: pynvvideocodec",
            "GPU decoding: torchcodec", "training step", "NCCL allreduce", "loader cores per GPU"}
ENVIRONMENT = ["Python", "torch", "CUDA available", "NVIDIA driver", "GPUs", "NCCL (torch)", "Horovod", "MPI",
               "Gloo (torch)", "GPU decoding: pynvvideocodec", "GPU decoding: torchcodec"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what doctor says without a GPU")


def demo_sets(root: Path) -> list[str]:
    """configs/demo.yaml on the tiny demo dataset at ``root`` (already rendered: no data.generate)."""
    sets = {"data.root": root, "data.train_list": root / "train.txt", "data.val_list": root / "val.txt",
            "data.generate": "null", "data.short_side": 32, "data.input_size": 32, "train.batch_size": 4}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def doctor(*args):
    return CliRunner().invoke(app, ["doctor", *map(str, args)], prog_name="tsmtrain")


def rows(record: dict) -> dict:
    return {r["check"]: r for r in record["rows"]}


@no_cuda
def test_demo_recipe_on_a_cpu_machine_skips_every_gpu_row_and_measures_the_loader(tiny_demo, tmp_path):
    out = tmp_path / "out.json"
    t0 = time.perf_counter()
    result = doctor(DEMO, "--json", out, "--clips", 8, *demo_sets(tiny_demo))
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - t0 < 60
    record = json.loads(out.read_text())
    assert record["tsmtrain_doctor"] == 1 and record["recipe"] == str(DEMO) and record["exit_status"] == 0
    assert record["host"] and record["time"][:2] == "20"
    found = rows(record)
    assert list(found) == ENVIRONMENT + ["loader (CPU)", "training step", "NCCL allreduce", "loader cores per GPU"]
    for check in GPU_ROWS - {"NVIDIA driver"}:  # the driver row reports nvidia-smi where it is installed
        assert (found[check]["status"], found[check]["detail"]) == ("skipped", NO_CUDA), check
        assert found[check]["required"] is False, check
    assert all(set(r) == {"check", "status", "value", "detail", "required"} for r in record["rows"])
    assert all(r["status"] in ("ok", "skipped", "fail") for r in record["rows"])
    # the CPU rows are measured, and what the demo recipe needs is required and works
    assert found["loader (CPU)"]["status"] == "ok" and found["loader (CPU)"]["required"]
    assert found["Horovod"]["required"] and found["Horovod"]["status"] == "ok"  # dist.engine: horovod
    figures = record["figures"]
    assert set(figures) == set(FIGURES)
    assert figures["loader_clips_per_s_per_core"] > 0
    assert all(figures[k] is None for k in FIGURES if k != "loader_clips_per_s_per_core")
    assert "verdict: no CUDA device; the loader gives" in result.stdout and "skipped" in result.stdout


@no_cuda
def test_a_recipe_that_needs_a_gpu_exits_1_naming_the_failing_rows(tiny_demo, tmp_path):
    out = tmp_path / "out.json"
    result = doctor(DEMO, "--json", out, "--clips", 4, *demo_sets(tiny_demo), "--set", "train.device=cuda")
    assert result.exit_code == 1, result.output
    assert "failed: CUDA available: no CUDA device" in result.stderr.splitlines()
    assert "failed: training step: no CUDA device" in result.stderr.splitlines()
    record = json.loads(out.read_text())
    failing = {r["check"] for r in record["rows"] if r["status"] == "fail"}
    assert failing == {"CUDA available", "GPUs", "training step"}
    assert all(rows(record)[c]["required"] for c in failing) and record["exit_status"] == 1
    # decoding on the GPU needs a GPU decoder that works: the recipe's data.decoder
    result = doctor(DEMO, "--json", out, "--clips", 4, *demo_sets(tiny_demo), "--set", "data.decode_device=cuda")
    assert result.exit_code == 1, result.output
    assert "failed: GPU decoding: torchcodec: no CUDA device" in result.stderr.splitlines()
    # ... while its CPU loader, whose workers then only read bytes, is measured but not required
    assert rows(json.loads(out.read_text()))["loader (CPU)"]["required"] is False


def test_a_bad_recipe_key_is_one_error_line_and_exit_2():
    result = doctor(DEMO, "--set", "data.bogus=1")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == ["error: --set: data.bogus = 1: unknown key"]


def test_without_a_recipe_only_the_environment_is_checked(tmp_path):
    out = tmp_path / "env.json"
    result = doctor("--json", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["recipe"] is None and [r["check"] for r in record["rows"]] == ENVIRONMENT
    assert {r["check"] for r in record["rows"] if r["required"]} >= {"Python", "torch"}
    assert "verdict: no recipe" in result.stdout


def test_loader_clips_per_s_on_the_cpu(tiny_demo, tmp_path):
    from tsmtrain.recipe import load_recipe

    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "doctor"))
    assert loader_clips_per_s(cfg, "torchcodec", "cpu", clips=6) > 0
    with pytest.raises(ValueError, match="at least 2 clips"):
        loader_clips_per_s(cfg, "torchcodec", "cpu", clips=1)


@pytest.mark.slow
def test_step_figures_on_the_cpu(tiny_demo, tmp_path):
    from tsmtrain.recipe import load_recipe

    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "doctor", train={"device": "cpu", "batch_size": 1},
                                  data={"num_segments": 2, "input_size": 16}))
    found = step_figures(cfg, steps=1, budget_s=0)
    assert set(found["clips_per_s"]) == {"fp32", "fp32+channels_last", "bf16+channels_last"}
    assert found["recipe_variant"] == "fp32" and found["recipe_clips_per_s"] == found["clips_per_s"]["fp32"]["tsm"]
    assert found["peak_gpu_memory_bytes"] is None and found["device"] == "cpu"


def test_allreduce_across_processes_and_bus_bandwidth():
    assert bus_bandwidth(10.0, 8) == pytest.approx(17.5)  # nccl-tests: algbw * 2 (n - 1) / n
    assert bus_bandwidth(10.0, 2) == 10.0
    found = allreduce_bandwidth(400_000, 2, backend="gloo", iters=3, timeout_s=60)
    assert found["ranks"] == 2 and found["bytes"] == 400_000 and len(found["times_s"]) == 3
    assert found["algbw_gb_per_s"] == pytest.approx(400_000 / found["seconds"] / 1e9)
    assert found["busbw_gb_per_s"] == pytest.approx(found["algbw_gb_per_s"])
    # never hangs: past the timeout every process is killed and the call raises
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 0.5 s"):
        allreduce_bandwidth(400_000, 2, backend="gloo", timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="2 ranks or more"):
        allreduce_bandwidth(4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_demo_recipe_on_a_gpu_measures_the_step(tiny_demo, tmp_path):
    out = tmp_path / "out.json"
    result = doctor(DEMO, "--json", out, "--clips", 8, "--steps", 2, *demo_sets(tiny_demo))
    record = json.loads(out.read_text())
    found, figures = rows(record), record["figures"]
    assert found["training step"]["status"] == "ok" and found["training step"]["required"], result.output
    assert figures["step_clips_per_s_per_gpu"]["fp32"]["tsm"] > 0 and figures["peak_gpu_memory_bytes"] > 0
    assert figures["cores_per_gpu_needed"] > 0 and figures["cores_per_gpu_available"] > 0
    assert result.exit_code == record["exit_status"]
