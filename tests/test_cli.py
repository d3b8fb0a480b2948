"""The ``tsmtrain`` command package (tsmtrain/cli/): every command's help, one ``error:`` line per
user mistake with exit status 2, the one relaunch helper of ``run`` and ``test``, and its shape:
small modules of small command functions that nothing in the library imports."""

import ast
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tsmtrain.cli import app
from tsmtrain.dist import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tsmtrain" / "cli"

MAX_MODULE_LINES = 250
MAX_FUNCTION_LINES = 40

COMMANDS = ["run", "test", "predict", "fuse", "extract", "validate", "model-info", "convert", "export", "prepare", "render", "submit", "env",
            "doctor", "sweep", "report", "bench"]
"""Every command, in the order ``tsmtrain --help`` lists them."""


def commands() -> list[list[str]]:
    """Every command and subcommand, as the arguments that name it (``["bench", "data"]``)."""
    group = typer.main.get_command(app)
    out = []
    for name, command in group.commands.items():
        out.append([name])
        out += [[name, sub] for sub in getattr(command, "commands", {})]
    return out


def invoke(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="tsmtrain", **kw)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def recipe(tmp_path: Path, **sections) -> Path:
    """A recipe whose list file exists (its videos need not)."""
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    doc = {"data": {"root": str(tmp_path), "train_list": str(tmp_path / "train.txt")}, "model": {"num_classes": 4},
           "run": {"dir": str(tmp_path / "runs")}}
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_every_command_is_registered_in_order_and_its_help_exits_0():
    assert [c[0] for c in commands() if len(c) == 1] == COMMANDS
    assert ["bench", "data"] in commands() and ["bench", "step"] in commands()
    top = invoke("--help")
    assert top.exit_code == 0 and "Large-batch training" in top.output
    for args in commands():
        result = invoke(*args, "--help")
        assert result.exit_code == 0, (args, result.output)
        assert f"Usage: tsmtrain {' '.join(args)}" in " ".join(result.output.split()), args


def test_validate_demo_recipe_exits_0():
    result = invoke("validate", REPO / "configs" / "demo.yaml", "--np", 4)
    assert result.exit_code == 0, result.output
    derived = yaml.safe_load(result.stdout)["derived"]
    assert derived["world_size"] == 4


def test_user_mistakes_are_one_error_line_and_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: {train_list: nowhere.txt}\noptim: {lerning_rate: 1}\n")
    good = recipe(tmp_path)
    cases = {
        ("validate", good, "--set", "dist.np=0"): "dist.np",
        ("validate", tmp_path / "missing.yaml"): "missing.yaml",
        ("run", good, "--set", "optim.base_lr=-1"): "optim.base_lr",
        ("test", good, "--crops", 4): "crops",
        ("test", good, "--list", tmp_path / "none.txt"): "none.txt: list file not found",
        ("render", good, "--nodes", 0): "cluster.nodes",
        ("bench", "data", good, "--split", "dev"): "--split: 'dev'",
        ("bench", "data", good, "--workers", "0"): "--workers",
        ("sweep", good, "--workers", 2, "--array"): "--array",
        ("report", tmp_path, "--predict", 8): "--predict and --network",
        ("prepare", "--out", tmp_path / "out"): "give a recipe",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = error_lines(result)
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert result.stderr.strip() == lines[0] and "Traceback" not in result.output, (args, result.output)
    # a bad recipe: one line per problem, each naming the key
    result = invoke("validate", tmp_path / "bad.yaml")
    assert result.exit_code == 2 and len(error_lines(result)) == len(result.stderr.splitlines()) >= 2
    assert any("optim.lerning_rate" in line for line in error_lines(result))
    # --np below 1 is refused by the option itself (usage error, status 2)
    assert invoke("validate", good, "--np", 0).exit_code == 2


@pytest.fixture
def launches(monkeypatch):
    """``launch_local`` recorded instead of run; this process is started by no launcher."""
    import tsmtrain.dist.local

    for key in (*LAUNCHER_VARIABLES, "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    calls = []

    def launch_local(np, launcher, run_args, run_dir=None):
        calls.append((np, launcher, run_args, run_dir))
        return 75

    monkeypatch.setattr(tsmtrain.dist.local, "launch_local", launch_local)
    return calls


def test_run_and_test_relaunch_through_one_helper(tmp_path, launches):
    path = recipe(tmp_path, dist={"engine": "ddp"})
    result = invoke("run", path, "--set", "train.seed=3", "--np", 2, "--no-resume")
    assert result.exit_code == 75, result.output
    assert launches.pop() == (2, "torchrun", ["run", str(path), "--set", "train.seed=3", "--set", "dist.np=2",
                                              "--no-resume"], tmp_path / "runs" / "run")
    result = invoke("test", path, "--np", 2, "--clips", 2, "--crops", 3, "--checkpoint", "c.pt")
    assert result.exit_code == 75, result.output
    assert launches.pop() == (2, "torchrun", ["test", str(path), "--set", "dist.np=2", "--clips", "2", "--crops",
                                              "3", "--weights", "c.pt"], None)


def test_env_refuses_through_the_engine_factory(tmp_path, monkeypatch):
    """``env`` creates its engine with ``choose_engine``, so a launched rank without Horovod is
    the training run's one line."""
    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.setitem(sys.modules, "tsmtrain.dist.horovod", None)  # as if Horovod were not installed
    result = invoke("env", recipe(tmp_path))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert line.startswith("error: dist.engine: horovod: cannot import it (") and line.endswith("run make setup")


def _functions(tree: ast.Module):
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)]


def test_modules_and_functions_are_small():
    """Each module of tsmtrain/cli at most 250 lines; each function at most 40 lines after its
    signature (docstring and body: typer's option declarations are the command's interface)."""
    registered = {c.callback.__name__ for c in typer.main.get_command(app).commands.values() if c.callback}
    registered |= {"bench_data", "bench_step"}
    found = set()
    for module in sorted(CLI.glob("*.py")):
        text = module.read_text()
        assert len(text.splitlines()) <= MAX_MODULE_LINES, module.name
        for node in _functions(ast.parse(text)):
            found.add(node.name)
            length = node.end_lineno - node.body[0].lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module.name}: {node.name}: {length} lines"
            if node.name in registered:
                assert ast.get_docstring(node), f"{module.name}: {node.name}: no docstring (its help)"
    assert registered <= found


def _imported(path: Path) -> set[str]:
    """The absolute names of the modules (and of the names from them) that ``path`` imports."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def test_nothing_outside_the_cli_imports_it():
    """The library never imports the command; only the entry point ``python -m tsmtrain`` does."""
    entry_point = REPO / "tsmtrain" / "__main__.py"
    assert "tsmtrain.cli.app" in _imported(entry_point)  # the check sees relative imports
    for path in sorted((REPO / "tsmtrain").rglob("*.py")):
        if CLI in path.parents or path == entry_point:
            continue
        cli = sorted(n for n in _imported(path) if n == "tsmtrain.cli" or n.startswith("tsmtrain.cli."))
        assert not cli, f"{path.relative_to(REPO)} imports {cli}"


HELP_SNAPSHOT = REPO / "tests" / "data" / "help.txt"
"""Every command's ``--help`` at 100 columns, as it was before the package moves of issue 31
(regenerate only for a deliberate change of an option or a docstring)."""


def all_help() -> str:
    """``tsmtrain --help`` and every command's and subcommand's, one after the other."""
    out = ["$ tsmtrain --help\n" + invoke("--help").output]
    for args in commands():
        out.append(f"$ tsmtrain {' '.join(args)} --help\n" + invoke(*args, "--help").output)
    return "".join(out)


def test_every_help_is_byte_identical_to_the_snapshot(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("TERM", "dumb")
    for name in ("FORCE_COLOR", "NO_COLOR", "LINES"):
        monkeypatch.delenv(name, raising=False)
    now = all_help()
    assert now.count("$ tsmtrain ") == len(commands()) + 1
    assert now == HELP_SNAPSHOT.read_text(), "a --help changed: compare with tests/data/help.txt"
