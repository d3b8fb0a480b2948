"""tsmtrain.child, the one way tsmtrain runs a program: its children die with their parent (the
paths that preparation, flow and the rendered datasets take, each through its real function),
a timeout kills the child and names the command, a failure gives the last stderr line, a missing
program is named; and no other module of tsmtrain starts a child by itself."""

import ast
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tsmtrain.child import ChildError, ChildTimeout, ProgramNotFound, run, start
from tsmtrain.errors import UserError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start time)`` of a process from /proc; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def _children(parent: int, name: str) -> dict[int, int]:
    """``{pid: start time}`` of the live processes whose parent is ``parent`` and command ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            with contextlib.suppress(OSError):
                if stat and stat[1] == parent and stat[0] not in "ZX" and (entry / "comm").read_text().strip() == name:
                    found[int(entry.name)] = stat[2]
    return found


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] not in "ZX"


def _still_running(seen: dict[int, int], within: float) -> list[int]:
    """Poll up to ``within`` s until none of ``seen`` (``{pid: start time}``) runs; those still running then."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p, t in seen.items() if _alive(p, t)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# Each parent reaches a stand-in ffmpeg/ffprobe (`exec sleep 60`) the way tsmtrain does, then waits
# for it; the stand-in's pid is the child's, its command `sleep`.
POOL = "from concurrent.futures import ThreadPoolExecutor\npool = ThreadPoolExecutor(1)\n"
PARENTS = {
    # tsmtrain prepare: ffprobe and ffmpeg run from the pool threads of run_task
    "prepare: ffprobe in a pool thread": POOL + "from tsmtrain.prep.encode import probe_source\n"
                                               "pool.submit(probe_source, SOURCE).result()\n",
    # prepare --flow, data.modality: flow: frames written to ffmpeg's stdin
    "flow: ffmpeg fed through a pipe": "import time\nfrom tsmtrain.prep.flow_files import _Writer\n"
                                       "w = _Writer(OUT, 4, 4, 25)\ntime.sleep(120)\n",
    # the rendered datasets: a clip piped into ffmpeg from the rendering pool
    "rendering: a synthetic clip in a pool thread": POOL + "import numpy as np\nfrom pathlib import Path\n"
                                                          "from tsmtrain.prep.synthetic import _encode\n"
                                                          "pool.submit(_encode, np.zeros((2, 8, 8, 3), np.uint8), "
                                                          "Path(OUT), 8).result()\n",
    "rendering: an arrow-of-time window": POOL + "from pathlib import Path\n"
                                                "from tsmtrain.prep.arrow_of_time import write_window\n"
                                                "pool.submit(write_window, Path(SOURCE), 0.0, 1.0, 32, True, "
                                                "Path(OUT)).result()\n",
    # the control: a child started without the helper outlives its parent (the check can fail)
    "control: subprocess.Popen": "import subprocess, time\nsubprocess.Popen(['ffmpeg'])\ntime.sleep(120)\n",
}


@linux_only
@pytest.mark.parametrize("path", PARENTS)
def test_a_child_dies_when_its_parent_is_killed(tmp_path, path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ffmpeg", "ffprobe"):
        (bin_dir / name).write_text("#!/bin/sh\nexec sleep 60\n")
        (bin_dir / name).chmod(0o755)
    source = tmp_path / "source.mp4"
    source.write_bytes(b"not read: the stand-in only sleeps")
    code = f"SOURCE, OUT = {str(source)!r}, {str(tmp_path / 'out.mkv')!r}\n" + PARENTS[path]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, seen = time.monotonic() + 60, {}
        while not seen and parent.poll() is None and time.monotonic() < deadline:
            seen = _children(parent.pid, "sleep")
            time.sleep(0.02)
        assert seen, f"no child within 60 s (exit {parent.poll()}): {parent.stderr.read().decode()[-2000:] if parent.poll() is not None else ''}"
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, not its process group
        parent.wait(timeout=30)
        if path.startswith("control"):
            time.sleep(2)
            assert _still_running(seen, within=0), "a plain Popen child died with its parent: the check cannot fail"
        else:
            left = _still_running(seen, within=30)
            assert not left, f"the child {left} outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(parent.pid, signal.SIGKILL)  # what a failure (or the control) left behind
        parent.kill()
        parent.wait(timeout=10)
        parent.stderr.close()


@linux_only
def test_a_started_child_gets_the_death_signal_asked_for(tmp_path):
    """``death_signal=SIGTERM`` (the sweep's local points, which checkpoint on it): the child gets
    SIGTERM, not SIGKILL, when its parent is killed."""
    marker = tmp_path / "got-sigterm"
    child_code = (f"import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w')"
                  f".close(), sys.exit(0)))\nprint('ready', flush=True)\ntime.sleep(120)\n")
    code = (f"import signal, sys, time\nfrom tsmtrain.child import start, PIPE\n"
            f"p = start([sys.executable, '-c', {child_code!r}], stdout=PIPE, death_signal=signal.SIGTERM)\n"
            f"p.stdout.readline()\nprint('started', flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline() == b"started\n"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child did not get SIGTERM when its parent died"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        parent.stdout.close()


def test_a_timeout_kills_the_child_and_names_the_command_and_the_seconds(tmp_path):
    pid_file = tmp_path / "pid"
    cmd = ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"]
    with pytest.raises(ChildTimeout) as caught:
        run(cmd, timeout=3)
    message = str(caught.value)
    assert "sh -c" in message and "sleep 60" in message and "3 s" in message, message
    assert caught.value.seconds == 3 and caught.value.returncode is None and isinstance(caught.value, UserError)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped before run() raised
        os.kill(pid, 0)


def test_a_failing_child_gives_its_last_stderr_line():
    code = "import sys; sys.stderr.write('first words\\n\\nlast words  \\n\\n'); sys.exit(3)"
    with pytest.raises(ChildError) as caught:
        run([sys.executable, "-c", code], timeout=60, what="testing")
    err = caught.value
    assert isinstance(err, UserError) and not isinstance(err, ChildTimeout)
    assert err.returncode == 3 and err.last_line == "last words" and "first words" in err.stderr
    assert str(err) == f"{os.path.basename(sys.executable)} failed testing (exit 3): last words"
    done = run([sys.executable, "-c", code], timeout=60, check=False)  # a probe reads the status itself
    assert done.returncode == 3 and done.stderr.splitlines()[0] == "first words"


def test_output_and_input_pass_through():
    done = run([sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())"], input="héllo",
               timeout=60)
    assert done.returncode == 0 and done.stdout == "HÉLLO"
    raw = run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
              input=b"\x00\xff", text=False, timeout=60)
    assert raw.stdout == b"\xff\x00"


def test_a_missing_program_is_named(tmp_path):
    for call in (lambda cmd: run(cmd, timeout=60), lambda cmd: start(cmd)):
        with pytest.raises(ProgramNotFound, match="^tsmtrain-no-such-program not found on PATH$"):
            call(["tsmtrain-no-such-program", "--version"])
        with pytest.raises(ProgramNotFound, match=f"^{tmp_path}/nothing not found$"):
            call([str(tmp_path / "nothing")])
    with pytest.raises(ChildError, match=f"^cannot run true: folder {tmp_path}/gone not found$"):
        run(["true"], timeout=60, cwd=tmp_path / "gone")


# --------------------------------------------------------------------------- one helper

SPAWNING = {("subprocess", name) for name in ("run", "Popen", "call", "check_call", "check_output", "getoutput",
                                              "getstatusoutput")} | {("os", "system"), ("os", "popen")}
ALLOWED = {
    "tsmtrain/child.py": "the helper itself",
    # `tsmtrain run --np N` starts a launcher (horovodrun, mpirun, torchrun) that owns the ranks and
    # passes stop signals on to them; SIGKILL on its parent's death would kill the launcher and
    # orphan the ranks instead of stopping them, so it keeps its own Popen and signal handling.
    "tsmtrain/dist/local.py": "the rank launcher",
}


def test_no_module_but_the_helper_starts_a_child():
    found = []
    for path in sorted((REPO / "tsmtrain").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
                names = {a.name for a in node.names} & {n for m, n in SPAWNING if m == "subprocess"}
                if names and rel not in ALLOWED:
                    found.append(f"{rel}:{node.lineno}: from subprocess import {', '.join(sorted(names))}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in SPAWNING
                  and rel not in ALLOWED):
                found.append(f"{rel}:{node.lineno}: {node.func.value.id}.{node.func.attr}()")
    assert not found, "start children through tsmtrain.child (run or start):\n" + "\n".join(found)


# ---- the tests' own helper for multi-rank children (tests/conftest.py)


@linux_only
def test_a_hung_test_child_fails_with_the_stacks_of_its_whole_session():
    from tests.conftest import run_child

    script = ("import os, time\n"
              "def waiting_in_the_child():\n"
              "    time.sleep(60)\n"
              "if os.fork() == 0:\n"
              "    waiting_in_the_child()\n"
              "waiting_in_the_child()\n")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_child([sys.executable, "-c", script], timeout=2)
    assert time.monotonic() - started < 30
    message = str(failed.value)
    assert "still ran after 2 s" in message
    assert message.count("in waiting_in_the_child") == 2  # the child and its own child both said where
    done = run_child([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stdout) == (3, "out\n")
