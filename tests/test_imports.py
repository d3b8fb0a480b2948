"""What the scaling study loads: neither the package nor ``tsmtrain report`` on a finished sweep
imports torch (nor the training code or the networks), checked in fresh interpreters."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import venv_env
from tests.test_report import FAILED_ERROR, make_sweep, point

REPO = Path(__file__).resolve().parents[1]

# Run the tsmtrain command in a fresh interpreter with a `torch` first on the path that refuses to
# be imported, then check that neither torch nor the training code nor the networks were loaded.
GUARD = """
import runpy, sys
sys.path.insert(0, {fake!r})
sys.argv = {argv!r}
status = 0
try:
    runpy.run_module("tsmtrain", run_name="__main__")
except SystemExit as stop:
    status = stop.code or 0
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] == "torch" or m.startswith(("tsmtrain.train", "tsmtrain.models")))
assert not loaded, f"loaded {{loaded}}"
sys.exit(status)
"""


def python(code: str, cwd) -> subprocess.CompletedProcess:
    env = venv_env()
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)


def fake_torch(root: Path) -> Path:
    """A directory whose `torch` package raises ImportError when imported."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text('raise ImportError("torch imported: tsmtrain report needs none")\n')
    return root


def test_scaling_package_imports_without_torch(tmp_path):
    done = python("import sys, tsmtrain.scaling, tsmtrain.dist.slurm; assert 'torch' not in sys.modules, 'torch'\n"
                  "import tsmtrain.scaling as s\n"
                  "names = set().union(*(getattr(s, m).__all__ for m in ('records', 'sweep', 'report', 'model')))\n"
                  "assert set(s.__all__) == names and len(s.__all__) == len(names), names ^ set(s.__all__)\n"
                  "assert all(hasattr(s, n) for n in s.__all__)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_report_on_a_finished_sweep_does_not_import_torch(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", [point(1), point(2), point(4, status="failed", error=FAILED_ERROR)])
    code = GUARD.format(fake=str(fake_torch(tmp_path / "fake")), argv=["tsmtrain", "report", str(sweep)])
    done = python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (sweep / "report" / "report.csv").is_file() and "wrote" in done.stdout

    # with the scaling model too
    net = tmp_path / "net.yaml"
    net.write_text("name: test\nranks_per_node: 2\nintra_node: {bandwidth_gb_per_s: 10, latency_us: 5}\n"
                   "inter_node: {bandwidth_gb_per_s: 1, latency_us: 20}\n")
    code = GUARD.format(fake=str(tmp_path / "fake"),
                        argv=["tsmtrain", "report", str(sweep), "--predict", "8,64", "--network", str(net)])
    done = python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: overlap fraction" in done.stderr

    # and its refusals are one line, still without torch
    (sweep / "points" / "workers-0002.json").write_text("{\n")
    done = python(GUARD.format(fake=str(tmp_path / "fake"), argv=["tsmtrain", "report", str(sweep)]), cwd=tmp_path)
    assert done.returncode == 2 and "workers-0002.json:2: not valid JSON" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
