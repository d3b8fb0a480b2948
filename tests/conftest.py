import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIPS = REPO.parent / "shared" / "clips"


def make_video(path: Path, frames: int = 12, size: int = 32) -> Path:
    """A small real H.264 file (ffmpeg's test pattern)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}x{size}:rate=8",
         "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The embedded demo dataset at a tiny size: 4 classes, 6 train and 2 val clips each."""
    from tsmtrain.prep.synthetic import generate_demo_dataset

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_dataset(root, num_classes=4, train_per_class=6, val_per_class=2, frames=8, size=32)
    return root


def tiny_recipe(path: Path, root: Path, name: str, **sections) -> Path:
    """Write a recipe for the tiny demo dataset at ``root`` to ``path`` (TSM-ResNet18 at 32x32,
    4 segments, 2 clips per rank, 2 epochs); ``sections`` update its sections key by key."""
    import yaml

    doc = {
        "data": {"root": str(root), "train_list": str(root / "train.txt"), "val_list": str(root / "val.txt"),
                 "num_segments": 4, "input_size": 32, "short_side": 32, "flip": False,
                 "workers": 1},
        "model": {"arch": "resnet18", "num_classes": 4, "dropout": 0.3},
        "optim": {"name": "sgd", "base_lr": 0.05, "base_batch": 4},
        "schedule": {"epochs": 2, "warmup_epochs": 1},
        "dist": {"engine": "horovod"},
        "train": {"batch_size": 2, "log_every": 1, "threads": 1},
        "run": {"name": name, "dir": str(path.parent / "runs")},
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    return path


def venv_env() -> dict:
    """This environment with the virtual environment's bin first (horovodrun, mpirun's children)."""
    import os
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def steps_logged(run_dir: Path) -> int:
    """The highest optimizer step in ``run_dir/metrics.jsonl`` so far (0 before the first)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line] or [0])


@pytest.fixture
def stop_requested(monkeypatch):
    """A stop request (SIGUSR2) that is already there when training starts."""
    from tsmtrain.dist.stop import StopRequest

    enter = StopRequest.__enter__

    def requested(self):
        enter(self)
        self.requested = True
        return self

    monkeypatch.setattr(StopRequest, "__enter__", requested)


def run_cli(*args, cwd: Path | None = None):
    """``tsmtrain ARGS`` in this process, as a child would run it from ``cwd`` (default: here), without
    a child's seconds of imports: a ``subprocess.CompletedProcess`` with the exit status, stdout, and
    stderr with the traceback of any exception that escaped the CLI appended (a child prints it)."""
    import os
    import traceback

    from typer.testing import CliRunner

    from tsmtrain.cli import app

    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], prog_name="tsmtrain")
    finally:
        os.chdir(here)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["tsmtrain", *map(str, args)], result.exit_code, result.stdout, stderr)
