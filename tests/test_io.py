"""The one way to write a durable file and to read a JSON one (:mod:`tsmtrain.io`).

* A process killed between the write and the rename leaves the old file (and only a hidden
  temporary file beside it).
* A full disk (ENOSPC) leaves the old file, removes the temporary file and says which file and
  "no space left".
* The file is fsync-ed before the rename and its folder after it.
* A JSON file that is not JSON is named with its line.
* No module of tsmtrain but tsmtrain/io.py renames a file into place.
"""

import ast
import errno
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import tsmtrain.io as tio
from tsmtrain.errors import UserError
from tsmtrain.io import FileWriteError, JsonFileError, commit, read_json, write_atomic, write_bytes, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a kill between write and rename

CRASH = """
import os, signal, sys
from tsmtrain.io import write_atomic
with write_atomic(sys.argv[1]) as part:
    with open(part, "w") as f:
        f.write("new")
        f.flush()
        os.fsync(f.fileno())
    print(part, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the whole new file is written, not yet renamed
"""


def test_a_kill_between_write_and_rename_leaves_the_old_file(tmp_path):
    target = tmp_path / "doc.txt"
    target.write_text("old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CRASH, str(target)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    part = Path(done.stdout.strip())
    assert part.parent == tmp_path and part.name.startswith(".doc.txt.part-")  # hidden, beside the target
    assert part.read_text() == "new"  # the kill came after the write ...
    assert target.read_text() == "old"  # ... and before the rename: the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["doc.txt", part.name])
    write_text(target, "newer")  # the leftover neither blocks nor replaces the next write
    assert target.read_text() == "newer" and part.read_text() == "new"


# ---------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _to_dev_full(real_open):
    def open_full(file, mode="r", *args, **kwargs):  # the temporary file's writes go to /dev/full
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
        return f
    return open_full


@pytest.mark.parametrize("where", ["write", "fsync", "block"])
def test_a_full_disk_leaves_the_old_file_and_names_it(tmp_path, monkeypatch, where):
    target = tmp_path / "sub" / "record.json"
    write_json(target, {"v": "old"})
    if where == "write":  # the kernel's ENOSPC, from /dev/full
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        monkeypatch.setattr(tio, "open", _to_dev_full(open), raising=False)
        write = lambda: write_json(target, {"v": "new" * 100_000})  # noqa: E731 - more than a buffer
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
        write = lambda: write_json(target, {"v": "new"})  # noqa: E731
    else:  # the block's own writer (torch.save, np.savez) fails after writing a part

        def write():
            with write_atomic(target) as part:
                part.write_text("{\"v\": \"ne")
                _enospc()

    with pytest.raises(FileWriteError) as err:
        write()
    assert str(err.value) == f"{target}: cannot write: no space left on the device"
    assert isinstance(err.value, UserError) and not isinstance(err.value, OSError)
    assert read_json(target) == {"v": "old"}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]  # no temporary file left


def test_an_exception_of_the_block_propagates_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "a.bin"
    write_bytes(target, b"old")
    with pytest.raises(KeyError):
        with write_atomic(target) as part:
            part.write_bytes(b"half")
            raise KeyError("not an OSError")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(TypeError):  # JSON cannot hold it: nothing is written at all
        write_json(target, {"a": object()})
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_commit_puts_a_file_another_program_wrote_in_place(tmp_path):
    target, part = tmp_path / "video.mp4", tmp_path / ".video.mp4.part-1"
    target.write_bytes(b"old")
    part.write_bytes(b"new")  # as ffmpeg writes it
    commit(part, target)
    assert target.read_bytes() == b"new" and not part.exists()
    with pytest.raises(FileWriteError, match=r"other\.mp4: cannot write: "):
        commit(tmp_path / ".absent.part-1", tmp_path / "other.mp4")
    assert not (tmp_path / "other.mp4").exists()


# ---------------------------------------------------------------- fsync of the file and of its folder


def test_the_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    target.write_text("old")
    synced, real = [], os.fsync

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, target.read_text()))  # what a reader sees at that moment
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text(target, "new")
    assert synced == [("file", "old"), ("folder", "new")]


# ---------------------------------------------------------------- reading JSON


def test_read_json_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "index.json"
    path.write_text('{\n "a": 1,\n "b": \n}\n')
    with pytest.raises(JsonFileError) as err:
        read_json(path, "shard index")
    assert str(err.value).startswith(f"{path}:4: the shard index is not JSON: ")
    assert "(column 1)" in str(err.value)
    with pytest.raises(JsonFileError, match="^" + re.escape(f"{tmp_path / 'absent.json'}: cannot read the sweep record: ")):
        read_json(tmp_path / "absent.json", "sweep record")
    path.write_text("[1, 2]\n")
    with pytest.raises(JsonFileError, match="^" + re.escape(f"{path}: the JSON file holds a list, not a JSON object") + "$"):
        read_json(path)
    assert read_json(path, kind=list) == [1, 2]
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(JsonFileError, match="^" + re.escape(f"{path}: the JSON file is not UTF-8 text (byte offset 7)") + "$"):
        read_json(path)
    write_json(path, {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]}


# ---------------------------------------------------------------- one writer in tsmtrain

ALLOWED = {
    # resume_checkpoint renames a damaged checkpoint aside (checkpoint-N.pt -> checkpoint-N.pt.corrupt)
    # for inspection: it moves an existing file, it does not put a newly written one in place
    ("tsmtrain/train/checkpoint.py", "os.replace(bad, kept)"),
}


def renames(tree: ast.AST) -> list[ast.Call]:
    """The calls in ``tree`` that rename a file: ``os.replace``/``os.rename``/``os.renames``,
    ``shutil.move``, and ``X.replace(Y)``/``X.rename(Y)`` with one argument (``Path``'s; a
    ``str.replace`` takes two)."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, attr = ast.unparse(node.func.value), node.func.attr
        if (owner == "os" and attr in {"replace", "rename", "renames"}) or (owner == "shutil" and attr == "move"):
            found.append(node)
        elif (attr in {"replace", "rename"} and len(node.args) == 1 and not node.keywords
              and not isinstance(node.func.value, ast.Constant)):
            found.append(node)
    return found


def test_the_rename_check_sees_every_form():
    code = "os.replace(a, b)\nos.rename(a, b)\ntmp.replace(path)\nPath(t).rename(p)\nshutil.move(a, b)\n" \
           "s.replace('a', 'b')\n'x'.replace(y)\nreplace(obj, a=1)\nd.replace(tzinfo=None)\n"
    assert [ast.unparse(c) for c in renames(ast.parse(code))] == [
        "os.replace(a, b)", "os.rename(a, b)", "tmp.replace(path)", "Path(t).rename(p)", "shutil.move(a, b)"]


def test_only_tsmtrain_io_renames_a_file_into_place():
    found = set()
    for path in sorted((REPO / "tsmtrain").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "tsmtrain/io.py":
            continue
        found |= {(rel, ast.unparse(c)) for c in renames(ast.parse(path.read_text()))}
    assert found - ALLOWED == set(), "write durable files with tsmtrain.io (write_atomic, write_*, commit)"
    assert ALLOWED <= found  # the allow-list names what is there
    io_calls = {ast.unparse(c) for c in renames(ast.parse((REPO / "tsmtrain" / "io.py").read_text()))}
    assert io_calls == {"os.replace(part, path)"}


WRITES_IN_PLACE = {
    # append-only journals, the designed exception (docs/failures.md, "Files on disk")
    ("tsmtrain/prep/journal.py", "open(path, 'ab+')"),
    ("tsmtrain/train/metrics_log.py", "open(self.path, 'a')"),
    # streams a child process writes into, read for its last lines: no one resumes from them
    ("tsmtrain/scaling/sweep.py", "open(log, 'w')"),
    ("tsmtrain/bench/doctor.py", "open(out, 'w')"),
    ("tsmtrain/bench/doctor.py", "open(err, 'w')"),
}


def writes_in_place(tree: ast.AST) -> list[str]:
    """The calls in ``tree`` that write a file where it lies: ``X.write_text``/``X.write_bytes``
    (``Path``'s), and ``open(X, MODE)`` with ``w``, ``a`` or ``x`` in MODE, unless X is ``part``
    (the temporary file :func:`tsmtrain.io.write_atomic` gives)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in {"write_text", "write_bytes"}:
            found.append(ast.unparse(node))
        elif isinstance(node.func, ast.Name) and node.func.id == "open" and len(node.args) >= 2:
            mode = node.args[1]
            if (isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax")
                    and ast.unparse(node.args[0]) != "part"):
                found.append(ast.unparse(node))
    return found


def test_durable_files_are_written_through_tsmtrain_io():
    found = set()
    for path in sorted((REPO / "tsmtrain").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel != "tsmtrain/io.py":
            found |= {(rel, call) for call in writes_in_place(ast.parse(path.read_text()))}
    assert found - WRITES_IN_PLACE == set(), "write durable files with tsmtrain.io (write_atomic, write_*, commit)"
    assert WRITES_IN_PLACE <= found  # the allow-list names what is there
    assert writes_in_place(ast.parse("p.write_text(s)\nopen(p, 'wb')\nopen(part, 'wb')\nopen(p)\nopen(p, 'rb')\n")) \
        == ["p.write_text(s)", "open(p, 'wb')"]
