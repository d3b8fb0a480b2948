"""Issue 30, item 2: no recipe value can add a line or a command to the job script.

A recipe with ``run: {dir: "runs/x\\ntouch MARKER #"}`` passed ``validate`` and ``tsmtrain render``
wrote ``touch MARKER #/rgb/recipe.yaml`` as a line of its own (in the ``# Recipe (paths
resolved):`` comment), a command before the ``#SBATCH`` lines that sbatch would then ignore. Now:

* a control character (line break, carriage return, NUL, tab, DEL, ...) in any text of a recipe
  is refused by the recipe check, with one line naming the key, by ``validate``, ``render`` and
  ``submit --dry-run``, from the recipe file, ``--set`` and the cluster flags alike;
* every other value (``$(...)``, backticks, quotes, ``;``, ``#``) is quoted: the demo job rendered
  with it in each field that reaches the script runs under bash (stand-ins for srun, mpirun,
  scontrol and sbatch) without creating the marker file, hands the value through unchanged, and
  keeps its ``#SBATCH`` block whole, as sbatch reads it. A double quote in an ``#SBATCH`` value is
  refused with one line (sbatch strips double quotes).

Rendering happens in this process (no torch is imported); bash runs each script.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tsmtrain.cli import app
from tsmtrain.dist.slurm import LaunchError, prepare_job, render_sbatch, submit
from tsmtrain.recipe import RecipeError, load_recipe
from tsmtrain.recipe.schema import control_character

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

CONTROL = {"newline": "\n", "carriage return": "\r", "NUL": "\0", "tab": "\t", "DEL": "\x7f"}
"""Control characters: refused by the recipe check in every field (every other one of U+0000 to
U+001F too: test_the_rule_covers_every_control_character)."""

HOSTILE = {"command substitution": "$(touch MARKER)", "backticks": "`touch MARKER`", "single quote": "'",
           "double quote": '"', "semicolon": ";touch MARKER;", "hash": " #x", "pipe and ampersand": "|touch MARKER&"}
"""Shell syntax: quoted wherever it reaches the script."""

BASE_CLUSTER = {"partition": "batch", "account": "acct", "qos": "normal", "constraint": "cpu", "reservation": "res",
                "job_name": "demo-job", "sbatch": ["--exclusive"], "setup": ["echo setup-ran"],
                "env": {"NOTE": "plain"}, "python": "/opt/py/bin/python", "mpi": "pmix"}
"""A cluster section that fills every line of the template that takes a value."""

LAYOUTS = {"horovod-srun": ({"engine": "horovod"}, {"launcher": "srun"}),
           "ddp-mpirun": ({"engine": "ddp"}, {"launcher": "mpirun"})}

SBATCH_FIELDS = ("cluster.job_name", "cluster.partition", "cluster.account", "cluster.qos", "cluster.constraint",
                 "cluster.reservation", "run.dir")
"""Fields written as an #SBATCH value (run.dir: --output) through the template's sbatch filter."""

SHELL_FIELDS = ("cluster.env", "cluster.python", "cluster.mpi", "cluster.sbatch")
"""Fields written into shell lines through q (env values, python, mpi) or verbatim as a whole
#SBATCH option (cluster.sbatch: a comment to bash); the launch line differs by layout, so these
are tried under both."""

FORMAT_FIELDS = ("run.name", "cluster.time", "cluster.mem", "dist.master_addr", "cluster.env.name")
"""Fields whose own format refuses any shell syntax (plain names, Slurm sizes, host names,
environment variable names)."""

ONLY_CONTROL_FIELDS = ("cluster.setup", "data.root", "data.classes", "model.pretrained")
"""Set-up lines are shell by design (only one line each); data paths never reach the script but
obey the same rule."""


def hostile_value(field: str, text: str, tmp_path: Path):
    """The value of ``field`` that carries ``text`` (as YAML data), and the key the error names."""
    word = f"a{text}b"
    values = {"run.dir": str(tmp_path / "runs" / word), "run.name": word, "cluster.time": f"01:00:00{text}",
              "cluster.mem": f"4G{text}", "dist.master_addr": f"node{text}1",
              "cluster.env": {"NOTE": word}, "cluster.env.name": {f"A{text}B": "x"},
              "cluster.python": f"/opt/py{text}/bin/python", "cluster.mpi": f"pm{text}ix",
              "cluster.sbatch": [f"--comment={word}", "--exclusive"], "cluster.setup": [f"echo {word}"],
              "data.root": str(tmp_path / word), "data.classes": str(tmp_path / word),
              "model.pretrained": str(tmp_path / word)}
    value = values.get(field, word)
    return ("cluster.env" if field == "cluster.env.name" else field), value


def write_demo(tmp_path: Path, field: str | None = None, value=None, layout: str = "horovod-srun") -> Path:
    """configs/demo.yaml with absolute paths, BASE_CLUSTER, a layout, and ``field`` set to ``value``."""
    doc = yaml.safe_load(DEMO.read_text())
    dist, cluster = LAYOUTS[layout]
    doc["dist"].update(dist)
    doc["cluster"] = {**BASE_CLUSTER, **cluster}
    doc["data"].update(root=str(tmp_path / "data" / "demo"), train_list=str(tmp_path / "data" / "demo" / "train.txt"),
                       val_list=str(tmp_path / "data" / "demo" / "val.txt"),
                       classes=str(REPO / "configs" / "lists" / "demo_classes.txt"))
    doc["run"]["dir"] = str(tmp_path / "runs")
    if field is not None:
        key = "cluster.env" if field == "cluster.env.name" else field
        section, name = key.split(".")
        doc[section][name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))  # escapes control characters: the YAML itself stays valid
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="tsmtrain")


def assert_one_error_naming(result, key: str, tmp_path: Path):
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


ALL_FIELDS = SBATCH_FIELDS + SHELL_FIELDS + FORMAT_FIELDS + ONLY_CONTROL_FIELDS


def test_the_rule_covers_every_control_character():
    for code in [*range(0x20), 0x7F]:
        assert control_character(f"runs/x{chr(code)}y").startswith("holds ")
        assert control_character(["ok", {"A": f"x{chr(code)}"}]).startswith("item 2 the value of 'A' holds ")
    for text in ("runs/x y", "$(touch MARKER) `x` 'q' \"d\" ;#|&<>*?~", "vidéos/日本\u00a0\u2028"):
        assert control_character(text) is None


@pytest.mark.parametrize("char", CONTROL.values(), ids=CONTROL.keys())
@pytest.mark.parametrize("field", ALL_FIELDS)
def test_control_characters_are_refused_naming_the_key(tmp_path, field, char):
    key, value = hostile_value(field, f"{char}touch MARKER #", tmp_path)
    path = write_demo(tmp_path, field, value)
    for command in (["render"], ["submit", "--dry-run"]) + ((["validate"],) if char == "\n" else ()):
        assert_one_error_naming(invoke(*command, path), key, tmp_path)
    assert not list(tmp_path.rglob("MARKER"))


def test_the_issue_reproduction_is_refused_by_the_real_cli(tmp_path):
    """The recipe of issue 30, through ``python -m tsmtrain``: exit 2, one error line, nothing written."""
    text = DEMO.read_text().replace("configs/lists/", f"{REPO}/configs/lists/")
    assert text.rstrip().endswith("run:\n  name: demo")
    path = tmp_path / "evil.yaml"
    path.write_text(text.rstrip()[:-len("run:\n  name: demo")] + 'run: {name: rgb, dir: "runs/x\\ntouch MARKER #"}\n')
    for command in (["validate"], ["render"], ["submit", "--dry-run"]):
        done = subprocess.run([sys.executable, "-m", "tsmtrain", *command, str(path)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {path}:")
        assert "run.dir" in done.stderr and "line break" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("MARKER")) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, key", [
    (["--set", 'run.dir="runs/x\\ntouch MARKER #"'], "--set: run.dir"),
    (["--set", 'cluster.setup=["module load x\\rtouch MARKER"]'], "--set: cluster.setup"),
    (["--set", 'cluster.env={"NCCL_DEBUG": "INFO\\u0000"}'], "--set: cluster.env"),
    (["--partition", "batch\ntouch MARKER"], "--partition: cluster.partition"),
    (["--python", "/usr/bin/python\r"], "--python: cluster.python"),
    (["--job-name", "job\x7f"], "--job-name: cluster.job_name"),
])
def test_overrides_and_flags_go_through_the_same_check(tmp_path, args, key):
    path = write_demo(tmp_path)
    for command in (["render"], ["submit", "--dry-run"]):
        assert_one_error_naming(invoke(*command, path, *args), key, tmp_path)


def sbatch_arguments(line: str) -> list[str]:
    """The arguments sbatch reads from an ``#SBATCH`` line (Slurm's ``_get_argument``): double or
    single quotes group and are dropped, a backslash escapes the next character, an unquoted
    ``#`` ends the line."""
    args, current, started, quote, escape = [], "", False, "", False
    for ch in line[len("#SBATCH"):]:
        if escape:
            current, started, escape = current + ch, True, False
        elif ch == "\\":
            escape = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                current += ch
        elif ch in "\"'":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                args.append(current)
            current, started = "", False
        else:
            current, started = current + ch, True
    if started:
        args.append(current)
    return args


def sbatch_block(script: str, verbatim: tuple[str, ...] = ()) -> dict[str, str]:
    """The options sbatch takes from the script: the ``#SBATCH`` lines before the first command,
    after checking that every line from the second up to it is a comment (or blank) and that no ``#SBATCH``
    line comes later (sbatch would ignore it). Each line holds one option, its value held
    together, except the ``verbatim`` options (``cluster.sbatch``: sbatch syntax of the user's)."""
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    first = next(i for i, line in enumerate(lines) if i and line.strip() and not line.startswith("#"))
    assert all(line.startswith("#") or not line.strip() for line in lines[1:first]), lines[1:first]
    assert not any(line.lstrip().startswith("#SBATCH") for line in lines[first:])
    options = {}
    for line in lines[1:first]:
        if line.startswith("#SBATCH") and line[len("#SBATCH "):] not in verbatim:
            args = sbatch_arguments(line)
            assert len(args) == 1, line  # one option per line, the value held together
            name, _, value = args[0].partition("=")
            options[name] = value
        elif line.startswith("#SBATCH"):
            options[line[len("#SBATCH "):]] = None
    return options


EXPECTED_SBATCH = ("--job-name", "--nodes", "--ntasks-per-node", "--time", "--partition", "--account", "--qos",
                   "--constraint", "--reservation", "--output", "--open-mode", "--requeue", "--signal")


def run_script(tmp_path: Path, script: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``script`` under bash in ``tmp_path/work`` with stand-ins for srun, mpirun, scontrol,
    sbatch and python that record their arguments (and NOTE) and exit 0; returns the result and
    the launcher's arguments."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    record = 'for a in "$@"; do printf "%s\\0" "$a"; done > "$ARGS_FILE"; printf "%s" "${NOTE-}" > "$NOTE_FILE"\n'
    for name in ("srun", "mpirun"):
        (bin_dir / name).write_text(f"#!/bin/bash\n{record}exit 0\n")
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo n1 && echo n2\nexit 0\n')
    for name in ("sbatch", "python", "python3"):
        (bin_dir / name).write_text("#!/bin/bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work), "ARGS_FILE": str(tmp_path / "args"),
           "NOTE_FILE": str(tmp_path / "note"), "SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "0"}
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args").read_text().split("\0")[:-1] if (tmp_path / "args").exists() else []
    return done, args


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("field, layout", [(f, "horovod-srun") for f in SBATCH_FIELDS + FORMAT_FIELDS]
                         + [(f, layout) for f in SHELL_FIELDS for layout in LAYOUTS])
def test_shell_syntax_is_quoted_or_refused_and_runs_nothing(tmp_path, field, text, layout):
    key, value = hostile_value(field, text, tmp_path)
    path = write_demo(tmp_path, field, value, layout)
    try:
        job = prepare_job(load_recipe(path, check_files=False))
    except RecipeError as err:  # a plain name, a Slurm size, a host or variable name: none takes shell syntax
        assert field in FORMAT_FIELDS and len(err.problems) == 1 and err.problems[0].key == key, str(err)
        return
    assert field not in FORMAT_FIELDS, f"{field} = {value!r} passed the recipe check"
    try:
        script = render_sbatch(job)
    except LaunchError as err:  # sbatch strips double quotes: one is refused in an #SBATCH value
        assert field in SBATCH_FIELDS and text == '"' and "double quote" in str(err) and "\n" not in str(err)
        return
    assert not (field in SBATCH_FIELDS and text == '"'), "a double quote was written into an #SBATCH line"
    options = sbatch_block(script, tuple(job.cluster.sbatch))
    assert set(EXPECTED_SBATCH) <= set(options) and "--exclusive" in options
    run_dir = Path(job.run.dir) / job.run.name
    expected = {"cluster.job_name": ("--job-name", value), "run.dir": ("--output", f"{run_dir}/slurm-%j.out")}
    option, want = expected.get(field, (f"--{field.split('.')[1]}", value))
    if field in SBATCH_FIELDS:
        assert options[option] == want  # the value arrives whole, as sbatch reads it
    if field == "cluster.sbatch":
        assert f"#SBATCH {value[0]}" in script.splitlines()

    done, args = run_script(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("MARKER")), script
    assert "setup-ran" in done.stdout
    # the launcher got the values unchanged: python, the recipe in the run directory, NOTE, --mpi
    assert args[-5:] == [job.cluster.python, "-m", "tsmtrain", "run", str(run_dir / "recipe.yaml")], args
    assert (tmp_path / "note").read_text() == job.cluster.env["NOTE"]
    if layout == "horovod-srun":
        assert f"--mpi={job.cluster.mpi}" in args
    else:
        assert "-x" in args and "NOTE" in args


def test_control_characters_from_outside_the_recipe_are_refused_by_the_renderer(tmp_path, monkeypatch):
    """Defence in depth: a value that never passed the recipe check (the interpreter running
    tsmtrain, a template's own text, a current directory with a line break) is refused by the
    renderer with one line, whatever filter it goes through, comments included."""
    doc = yaml.safe_load(write_demo(tmp_path).read_text())
    del doc["cluster"]["python"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    job = prepare_job(load_recipe(path, check_files=False))
    monkeypatch.setattr(sys, "executable", "/opt/py\ntouch MARKER #/python")
    with pytest.raises(LaunchError, match="line break"):
        render_sbatch(job)
    monkeypatch.undo()
    for line in ("# {{ recipe_file ~ '\\ntouch MARKER' }}", "X={{ run_dir ~ '\\r' | q }}",
                 "#SBATCH --job-name={{ '\\0' | sbatch }}"):
        own = tmp_path / "own.j2"
        own.write_text("#!/bin/bash\n" + line + "\n")
        with pytest.raises(LaunchError) as err:
            render_sbatch(job, own)
        assert "\n" not in str(err.value) and "holds" in str(err.value)
    bent = tmp_path / "a\nb"
    bent.mkdir()
    doc["run"]["dir"] = "runs"  # relative: made absolute against the current directory
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path, check_files=False)
    monkeypatch.chdir(bent)
    with pytest.raises(LaunchError, match=r"run\.dir .*line break"):
        submit(recipe, dry_run=True)
    assert not list(tmp_path.rglob("MARKER")) and not (bent / "runs").exists()


def test_sweep_array_script_quotes_its_own_values(tmp_path, monkeypatch):
    """tsmtrain sweep --submit --array writes its own #SBATCH lines: the job name comes from the
    recipe file's name and the log from --out, neither a recipe value; they go through the same
    sbatch filter, and a line break in the recipe file's name is refused with one line."""
    from tsmtrain.scaling.sweep import plan_sweep, run_sweep

    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "$@" >> "$(dirname "$0")/calls"; echo 77\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    doc = yaml.safe_load(write_demo(tmp_path).read_text())
    doc["cluster"]["tasks_per_node"] = 2
    for name, refused in (("sweep $(touch MARKER) 'x'", False), ("sweep\ntouch MARKER #", True)):
        recipe_file = tmp_path / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(doc))
        recipe = load_recipe(recipe_file, check_files=False)
        sweep_dir = tmp_path / ("refused" if refused else "sweep dir")
        plan = plan_sweep(recipe, str(recipe_file), [1, 2], sweep_dir, launch="submit", videos=64)
        if refused:
            with pytest.raises(LaunchError, match="line break"):
                run_sweep(plan, launch="submit", array=True)
            continue
        run_sweep(plan, launch="submit", array=True)
        script = (sweep_dir / "array-0001-nodes.sbatch").read_text()
        options = sbatch_block(script)
        assert options["--job-name"] == f"{name}-sweep"
        assert options["--output"] == f"{sweep_dir}/runs/array-%A_%a.out"
        assert options["--array"] == "0-1" and subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not list(tmp_path.rglob("MARKER"))
