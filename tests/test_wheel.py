"""tsmtrain as a cluster user installs it (issue 31, item 6): ``pip wheel`` of the repository, the
wheel installed (not editable) into a fresh virtual environment, and the CLI run from a folder
outside the repository: validate, render and submit --dry-run of the demo recipe, and a one-epoch
tiny training that writes a checkpoint.

The fresh environment has no pip and no PyPI packages of its own: a ``.pth`` file puts this
environment's site-packages after its own, for torch and the other dependencies. A ``.pth`` line
that names a folder adds the folder to ``sys.path`` without running the ``.pth`` files in it, so
this environment's editable install of tsmtrain (a ``__editable__`` finder) stays off; every
check asserts that ``tsmtrain`` is imported from the new environment's site-packages."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

DEMO = "configs/demo.yaml"
DEMO_FILES = [DEMO, "configs/lists/demo_classes.txt"]  # the demo recipe and the files it names


def _run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _package_files() -> list[str]:
    """Every file of the tsmtrain package in the repository, relative to it (git's list where
    there is one, so that stray untracked files do not count)."""
    try:
        out = subprocess.run(["git", "ls-files", "tsmtrain"], cwd=REPO, capture_output=True, text=True, check=True)
        files = out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [str(p.relative_to(REPO)) for p in (REPO / "tsmtrain").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    return sorted(f for f in files if (REPO / f).is_file())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the new environment's python, its site-packages, the environment for its CLI)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # a copy: the build writes build/ and tsmtrain.egg-info/ beside the sources
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(REPO / name, src / name)
    for f in _package_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, "."],
         cwd=src)
    (wheel,) = dist.glob("tsmtrain-*.whl")

    venv = base / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=base)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz-tsmtrain-test-dependencies.pth").write_text("".join(f"{p}\n" for p in deps))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    # the native temporal shift is built from the installed csrc/ (checked below) but not here:
    # a build from a new source path takes minutes; training uses the PyTorch shift instead
    env["TSMTRAIN_NATIVE_SHIFT"] = "0"
    return wheel, python, site, env


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_package(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _package_files() if f not in names]
    assert not missing, f"{wheel.name} lacks {missing}: add them to [tool.setuptools.package-data]"


@pytest.mark.slow
def test_the_installed_package_reads_its_data_files_from_site_packages(installed, tmp_path):
    _, python, site, env = installed
    code = ("import tsmtrain, tsmtrain.dist.slurm as s, tsmtrain.models.shift as m, tsmtrain.data.decoding as d\n"
            "for p in [tsmtrain.__file__, s.TEMPLATE_DIR / s.DEFAULT_TEMPLATE, m.NATIVE_SOURCE, d.PROBE_CLIP]:\n"
            "    print(p, p is tsmtrain.__file__ or p.is_file())\n")
    lines = _run([python, "-c", code], cwd=tmp_path, env=env).stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        path, exists = line.rsplit(" ", 1)
        assert Path(path).is_relative_to(site / "tsmtrain") and exists == "True", line


@pytest.mark.slow
def test_the_installed_cli_validates_renders_and_submits_the_demo_outside_the_repository(installed, tmp_path):
    _, python, site, env = installed
    for f in DEMO_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    tsmtrain = python.parent / "tsmtrain"  # the console script pip wrote
    where = _run([python, "-c", "import tsmtrain; print(tsmtrain.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(site), where

    validated = _run([tsmtrain, "validate", DEMO], cwd=tmp_path, env=env).stdout
    assert "global_batch: 16" in validated
    script = _run([tsmtrain, "render", DEMO], cwd=tmp_path, env=env).stdout
    assert script.startswith("#!") and "#SBATCH --nodes" in script and "tsmtrain run" in script
    assert f"{python}" in script  # the job runs the new environment's python
    _run([tsmtrain, "submit", "--dry-run", DEMO], cwd=tmp_path, env=env)
    job = tmp_path / "runs" / "demo" / "job.sbatch"
    assert "#SBATCH --nodes" in job.read_text() and f"{python}" in job.read_text() and os.access(job, os.X_OK)
    assert (tmp_path / "runs" / "demo" / "recipe.yaml").is_file()


@pytest.mark.slow
def test_the_installed_cli_trains_the_demo_recipe_for_one_epoch(installed, tiny_demo, tmp_path):
    """The demo recipe on the tiny rendered demo (conftest's ``tiny_demo``: 24 training clips at
    32x32) instead of its own 1,000 clips at 64x64, for one epoch."""
    _, python, _, env = installed
    for f in DEMO_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    small = {"data.generate": "null", "data.root": tiny_demo, "data.train_list": tiny_demo / "train.txt",
             "data.val_list": tiny_demo / "val.txt", "data.input_size": 32, "data.short_side": 32,
             "data.num_segments": 4, "schedule.epochs": 1, "schedule.warmup_epochs": 0, "train.batch_size": 4,
             "train.threads": 1, "run.name": "tiny"}
    overrides = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    out = _run([python.parent / "tsmtrain", "run", DEMO, *overrides], cwd=tmp_path, env=env)
    assert "final validation top-1" in out.stdout + out.stderr
    assert [p.name for p in (tmp_path / "runs" / "tiny").glob("checkpoint-*.pt")] == ["checkpoint-00000006.pt"]


NOT_FROM_PIP = {"horovod": "built by hand with a patch (docs/installing.md#without-root)"}
"""Libraries the package imports that no dependency or extra installs, and why."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_the_package_imports_is_a_dependency_or_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    declared = {_canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}
    installs = {m: {_canonical(d) for d in ds} for m, ds in importlib.metadata.packages_distributions().items()}
    installs.setdefault("PyNvVideoCodec", {"pynvvideocodec"})  # the gpu extra; not installed on CPU machines
    imported = set()
    for path in (REPO / "tsmtrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "tsmtrain")
    assert "psutil" in third_party and "torchcodec" in third_party  # the walk finds lazy imports too
    undeclared = [m for m in third_party if m not in NOT_FROM_PIP and not installs.get(m, {m}) & declared]
    assert not undeclared, f"tsmtrain imports {undeclared}, which no dependency or extra of pyproject.toml installs"
