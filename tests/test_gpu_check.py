"""The GPU check (scripts/gpu_check.sh) in its --cpu-only mode: every stage runs on this machine and
writes the JSON files a GPU machine would fill, with "skipped: no CUDA device" where a GPU figure
would be. The GPU run itself has not happened yet (docs/performance.md, "The GPU check")."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SHARED_CLIPS

NO_CUDA = "skipped: no CUDA device"


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    if not SHARED_CLIPS.is_dir():
        pytest.skip(f"{SHARED_CLIPS} is absent: the check's stand-in bundle is prepared from the real clips")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it): the stand-in bundle is encoded with it")
    pytest.importorskip("torchcodec", reason="the --cpu-only check decodes with torchcodec on the CPU")
    out = tmp_path / "out"
    # PYTHON: this interpreter; TMPDIR: the scratch folder under tmp_path; GPU_CHECK_BUNDLE: no full
    # bundle, so that the check makes its small stand-in (what CI, which has no .gpu-bundle, runs)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "GPU_CHECK_BUNDLE": str(tmp_path / "none")}
    start = time.monotonic()
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--cpu-only"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    seconds = time.monotonic() - start
    log = (out / "logs" / "check.log").read_text() if (out / "logs" / "check.log").is_file() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{log[-4000:]}"
    assert "exit status 0" in done.stdout and "stage" in done.stdout  # the table

    files = {name: json.loads((out / f"{name}.json").read_text()) for name in ("env", "doctor", "demo", "nvdec",
                                                                               "summary")}
    summary = files["summary"]
    assert summary["mode"] == "cpu-only" and summary["complete"] and summary["exit_status"] == 0
    assert [s["stage"] for s in summary["stages"]] == ["bundle", "install", "env", "doctor", "demo", "nvdec"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["failed"] == [] and summary["elapsed_s"] <= seconds
    figures = summary["figures"]
    for key in ("gpu", "driver", "demo_peak_gpu_memory_gib", "nvdec_clips_per_s", "nvdec_max_abs_diff",
                "nvdec_mean_abs_diff"):
        assert figures[key] == NO_CUDA, key
    assert figures["demo_engine"] == "ddp/gloo" and figures["doctor_exit_status"] == 0
    assert 0 <= figures["demo_final_top1"] <= 100 and figures["demo_clips_per_s"] > 0
    assert figures["cpu_decoder_clips_per_s"] > 0
    assert (out / "logs" / "check.log").is_file() and "===== stage demo =====" in log

    env = files["env"]
    assert env["status"] == "ok" and env["problems"] == []
    assert env["python"]["version"] and env["torch"]["version"] and env["torch"]["cuda_available"] is False
    assert env["cuda"] == NO_CUDA and env["gpu_decoders"] == {"pynvvideocodec": NO_CUDA, "torchcodec": NO_CUDA}
    if shutil.which("nvidia-smi") is None:
        assert env["driver"] == NO_CUDA
    assert isinstance(env["installed_from_bundle"], list)
    assert env["install"]["skipped"] == {"pynvvideocodec": NO_CUDA}  # GPU-only: not installed here
    assert {"pydantic", "typer", "rich", "pyyaml"} <= set(env["install"]["present"]) | {
        i["name"] for i in env["install"]["installed"]}
    assert env["packages"]["torchvision"]["version"] and env["torchvision"]["from"] in ("system", "bundle")

    doctor = files["doctor"]
    assert doctor["exit_status"] == 0 and doctor["recipe"].endswith("demo.yaml")
    rows = {r["check"]: r for r in doctor["rows"]}
    for check in ("CUDA available", "GPUs", "NCCL (torch)", "GPU decoding: pynvvideocodec", "training step"):
        assert rows[check]["status"] == "skipped" and rows[check]["detail"].startswith("no CUDA device"), rows[check]
    assert rows["loader (CPU)"]["status"] == "ok"

    demo = files["demo"]
    assert demo["status"] == "ok" and demo["problems"] == []
    assert demo["engine"] == "ddp" and demo["backend"] == "gloo" and demo["world_size"] == 1
    assert demo["device"] == "cpu" and demo["precision"] == "fp32" and demo["channels_last"] is True
    assert demo["steps"] == 4 and demo["epochs"] == 2 and len(demo["top1_per_epoch"]) == 2
    assert demo["final_top1"] == demo["top1_per_epoch"][-1] and demo["clips_per_s"] > 0 and demo["wall_s"] > 0
    assert demo["gpu"] == NO_CUDA and demo["peak_gpu_memory_gib"] == NO_CUDA
    assert demo["decoder_asked"] == "torchcodec" and demo["decoder_fell_back"] is False
    # train.tensorboard=false: neither TensorBoard nor matplotlib is imported by the training process
    assert not any(demo["imported"][m] for m in ("tensorboard", "torch.utils.tensorboard", "matplotlib"))
    assert any("val_top1" in m for m in demo["metrics"])

    nvdec = files["nvdec"]
    assert nvdec["status"] == "ok" and nvdec["problems"] == []
    assert nvdec["nvdec"] == NO_CUDA and nvdec["tolerance"] == NO_CUDA and nvdec["clips_per_s"] == NO_CUDA
    assert nvdec["gpu_decoders"]["pynvvideocodec"] == NO_CUDA
    assert nvdec["videos"] >= 1 and nvdec["cpu"]["clips_per_s"] > 0
    # the comparison itself, run on the CPU decoder: it gives the reference frames back exactly
    ref = nvdec["cpu_vs_reference"]
    assert ref["errors"] == 0 and ref["max_abs_diff"] == 0 and ref["all_frames_nearest_own_index"] is True
    assert ref["clips"] == len(nvdec["reference"]["clips"]) >= 1
