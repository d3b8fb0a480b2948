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


def run_child(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)``, except that
    a child still running after ``timeout`` seconds fails the test with every Python stack of its
    processes: the child starts in its own session with ``PYTHONFAULTHANDLER=1``, and on timeout
    the whole session gets SIGABRT, on which Python prints each thread's stack and dies (the ranks
    and loader workers of a launcher included). A hang in CI then says where it hung."""
    import os
    import signal

    env = {**(kw.pop("env", None) or os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} still ran after {timeout} s; its processes' stacks:\n"
                    f"{(out or '')[-4000:]}\n{(err or '')[-16000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
