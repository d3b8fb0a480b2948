"""Checkpoints a run can trust, and one run per run directory.

* A second ``tsmtrain run`` on a directory another run holds stops at once with one line naming
  the holder; once the holder has ended (however it ended) a run proceeds.
* A damaged newest checkpoint (half a file, zero bytes) is skipped with a warning naming it, and
  the run resumes from the previous one to exactly the weights of an uninterrupted run; its
  metrics.jsonl then holds every step once.
* A ``.checkpoint-*.tmp`` left by a killed write is removed at the next start.
* A full disk while checkpointing is one line naming the file and the cause, with no temporary
  file left and the previous checkpoint intact, on every rank.
"""

import builtins
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_recipe as recipe_file
from tests.conftest import run_cli, venv_env
from tests.test_train import read_metrics, tiny_recipe
from tsmtrain.train import TrainingError, train
from tsmtrain.train import checkpoint as ckpt
from tsmtrain.train.metrics_log import truncate_metrics
from tsmtrain.train.rundir import LOCK_FILE, RunDirInUse, RunLock, claim_run_dir, lock_holder

REPO = Path(__file__).resolve().parents[1]
SMALL = {"data.input_size": 8, "data.num_segments": 2, "schedule.epochs": 1, "schedule.warmup_epochs": 0,
         "train.threads": 1}  # 24 clips / 4 per step: 6 steps of a tiny TSM-ResNet18
TIMEOUT = 300  # seconds for a subprocess: a hang fails the test instead of stalling the suite


class FakeEngine:
    """A rank of a multi-rank job whose collectives return what the other ranks would send:
    ``answers[name]`` is the gathered list; records what this rank sent."""

    def __init__(self, rank, size, answers=None):
        self.rank, self.size, self.answers, self.sent = rank, size, answers or {}, {}

    def allgather_object(self, obj, name="object"):
        self.sent[name] = obj
        gathered = list(self.answers.get(name, [None] * self.size))
        gathered[self.rank] = obj
        return gathered

    def barrier(self):
        raise AssertionError("a barrier cannot tell the ranks that rank 0 failed")


def cli(*args, env=None, timeout=TIMEOUT):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or venv_env(), cwd=REPO)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- the lock


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with RunLock.acquire(run_dir) as lock:
        assert lock.held and (run_dir / LOCK_FILE).is_file()
        holder = lock_holder(run_dir)
        assert holder["pid"] == os.getpid() and holder["host"]
        assert holder["started"][:4].isdigit() and "T" in holder["started"]  # ISO 8601
        with pytest.raises(RunDirInUse) as refused:
            RunLock.acquire(run_dir)  # another open file description, as another process would have
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{run_dir} is in use by another run")
        assert f"pid {os.getpid()}" in message and f"host {holder['host']}" in message
        assert "choose another run.name" in message
    assert not lock.held
    again = RunLock.acquire(run_dir)  # released: free again
    again.release()
    again.release()  # idempotent


def test_every_rank_learns_that_the_directory_is_taken(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with RunLock.acquire(run_dir):
        rank0 = FakeEngine(0, 2)
        with pytest.raises(RunDirInUse, match="is in use by another run"):
            claim_run_dir(rank0, run_dir)
        refusal = rank0.sent["run_dir_lock"]
        assert refusal[0] is True and "is in use" in refusal[1]  # what rank 0 told the others
    rank1 = FakeEngine(1, 2, {"run_dir_lock": [refusal, None]})
    with pytest.raises(RunDirInUse) as raised:  # rank 1 stops too instead of waiting in a collective
        claim_run_dir(rank1, tmp_path / "elsewhere")
    assert str(raised.value) == refusal[1]
    assert not (tmp_path / "elsewhere").exists()  # rank 1 locks nothing
    assert claim_run_dir(FakeEngine(1, 2), run_dir) is None  # rank 0 took it: rank 1 goes on, holding nothing
    lock = claim_run_dir(FakeEngine(0, 2), run_dir)
    assert lock.held and lock_holder(run_dir)["pid"] == os.getpid()
    lock.release()


def test_failed_set_up_releases_the_lock(tmp_path, tiny_demo):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_recipe(tmp_path, tiny_demo, "fresh", **SMALL), resume=True)
    RunLock.acquire(tmp_path / "runs" / "fresh").release()  # free: the failed run let go of it


def test_second_run_on_a_held_directory_is_refused_in_one_line(tmp_path, tiny_demo):
    path = recipe_file(tmp_path / "held.yaml", tiny_demo, "held", dist={"engine": "none"},
                       data={"input_size": 8, "num_segments": 2, "workers": 0},
                       schedule={"epochs": 1, "warmup_epochs": 0}, train={"batch_size": 4, "stop_after_steps": 1})
    run_dir = tmp_path / "runs" / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tsmtrain.train.rundir import RunLock\n"
                               "lock = RunLock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)",
         str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=venv_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        stale = run_dir / ".checkpoint-held.tmp"  # the holder's write in progress: not to be removed
        stale.write_bytes(b"x" * 1000)
        start = time.monotonic()
        proc = run_cli("run", path)  # in this process: the lock's holder is another process all the same
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert time.monotonic() - start < 120
        assert "Traceback" not in proc.stderr
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and len([s for s in proc.stderr.splitlines() if s.strip()]) == 1, proc.stderr
        assert f"{run_dir} is in use by another run (host " in errors[0]
        assert f"pid {holder.pid}, started " in errors[0] and "choose another run.name" in errors[0]
        assert stale.exists()  # nothing of the running run's was touched, nothing written
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([LOCK_FILE, stale.name])
    finally:
        holder.kill()  # as kill -9 would: the kernel releases the lock
        holder.wait(timeout=TIMEOUT)
    assert train(tiny_recipe(tmp_path, tiny_demo, "held", **SMALL, **{"train.stop_after_steps": 1})).step == 1
    assert not stale.exists()  # the holder is gone: its temporary file was stale


def test_lock_ends_with_its_holder_not_with_its_forked_children(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    code = ("import os, sys, time\nfrom tsmtrain.train.rundir import RunLock\n"
            "lock = RunLock.acquire(sys.argv[1])\nchild = os.fork()\n"
            "if child == 0:\n    time.sleep(600)\n    os._exit(0)\n"  # as a data-loading worker
            "print(child, flush=True)\ntime.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env=venv_env())
    worker = None
    try:
        worker = int(holder.stdout.readline())
        with pytest.raises(RunDirInUse, match=f"pid {holder.pid},"):
            RunLock.acquire(run_dir)
        holder.kill()
        holder.wait(timeout=TIMEOUT)
        os.kill(worker, 0)  # the forked child lives on ...
        RunLock.acquire(run_dir).release()  # ... and the directory is free all the same
    finally:
        holder.kill()
        if worker is not None:
            try:
                os.kill(worker, 9)
            except ProcessLookupError:
                pass


def test_two_ddp_ranks_both_stop_on_a_held_directory(tmp_path, tiny_demo):
    pytest.importorskip("torch.distributed")
    path = recipe_file(tmp_path / "ddp.yaml", tiny_demo, "ddp", dist={"engine": "ddp", "np": 2},
                       data={"input_size": 8, "num_segments": 2, "workers": 0})
    with RunLock.acquire(tmp_path / "runs" / "ddp"):
        proc = cli("-m", "tsmtrain", "run", path)  # rank 1 must not wait for a rank 0 that left
    assert proc.returncode != 0, proc.stderr[-3000:]
    # each rank says it (their lines may interleave), and none fails inside tsmtrain (torchrun's
    # own traceback about a failed child is the launcher's)
    assert proc.stderr.count("is in use by another run (host ") == 2, proc.stderr[-3000:]
    assert "tsmtrain/train" not in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- reading checkpoints


def _checkpoint(path, value=1.0):
    torch.save({"model": {"w": torch.full((1000,), value)}, "step": 1, "recipe": {}}, path)
    return path


def test_check_checkpoint_tells_intact_empty_truncated_and_corrupt(tmp_path):
    good = _checkpoint(tmp_path / "good.pt")
    assert ckpt.check_checkpoint(good) is None
    assert torch.equal(ckpt.load_checkpoint(good)["model"]["w"], torch.ones(1000))
    data = good.read_bytes()
    empty, half, flipped = tmp_path / "empty.pt", tmp_path / "half.pt", tmp_path / "flipped.pt"
    empty.write_bytes(b"")
    half.write_bytes(data[: len(data) // 2])
    at = data.index(b"\x00\x00\x80\x3f" * 4) + 8  # inside the tensor's bytes (float 1.0)
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    assert ckpt.check_checkpoint(empty) == "empty (0 bytes)"
    assert ckpt.check_checkpoint(half) == "truncated (not a complete zip archive)"
    assert ckpt.check_checkpoint(flipped).startswith("corrupt (member ") and "CRC" in ckpt.check_checkpoint(flipped)
    assert ckpt.check_checkpoint(flipped, crc=False) is None  # the cheap check reads the archive's end only
    assert ckpt.check_checkpoint(tmp_path / "absent.pt").startswith("unreadable")
    for path, reason in ((empty, "empty"), (half, "truncated"), (flipped, "corrupt")):
        with pytest.raises(ckpt.CheckpointError, match=reason) as err:  # never torch.load: it aborts on 0 bytes
            ckpt.load_checkpoint(path)
        assert err.value.path == path and str(err.value).startswith(str(path))


def test_zero_byte_checkpoint_is_an_error_not_an_abort(tmp_path):
    (tmp_path / "checkpoint-00000001.pt").write_bytes(b"")
    code = ("import sys\nfrom tsmtrain.train.checkpoint import load_checkpoint\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept Exception as err:\n    print(err)\n    sys.exit(3)")
    proc = cli("-c", code, tmp_path / "checkpoint-00000001.pt")
    assert proc.returncode == 3, proc.stderr  # torch.load may abort the interpreter on it (a user saw "Aborted.")
    assert "checkpoint-00000001.pt: empty (0 bytes)" in proc.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_demo):
    """The final weights and metrics of the small recipe run without interruption."""
    tmp = tmp_path_factory.mktemp("ref")
    result = train(tiny_recipe(tmp, tiny_demo, "ref", **SMALL))
    assert result.step == 6
    return result.model.state_dict(), read_metrics(tmp / "runs" / "ref")


def _cut_twice(tmp_path, tiny_demo, name):
    """A run stopped at step 2, then again at step 4: checkpoints of steps 2 and 4 on disk."""
    assert train(tiny_recipe(tmp_path, tiny_demo, name, **SMALL, **{"train.stop_after_steps": 2})).step == 2
    assert train(tiny_recipe(tmp_path, tiny_demo, name, **SMALL, **{"train.stop_after_steps": 4})).step == 4
    run_dir = tmp_path / "runs" / name
    assert [p.name for p in ckpt.checkpoints(run_dir)] == ["checkpoint-00000004.pt", "checkpoint-00000002.pt"]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", [("half", "truncated (not a complete zip archive)"),
                                            ("empty", "empty (0 bytes)")])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, tiny_demo, uninterrupted,
                                                                        damage, reason):
    ref_weights, ref_metrics = uninterrupted
    run_dir = _cut_twice(tmp_path, tiny_demo, "cut")
    latest = run_dir / "checkpoint-00000004.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2] if damage == "half" else b"")

    resumed = train(tiny_recipe(tmp_path, tiny_demo, "cut", **SMALL))

    assert resumed.step == 6
    log = (run_dir / "train.log").read_text()
    assert f"skipped checkpoint-00000004.pt: {reason}" in log
    assert f"resuming from {run_dir / 'checkpoint-00000002.pt'} at step 2" in log
    assert (run_dir / "checkpoint-00000004.pt.corrupt").exists()  # kept for a look, no longer a checkpoint
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"] == 6
    for name, a in ref_weights.items():
        assert torch.equal(a, resumed.model.state_dict()[name]), name
    # steps 3 and 4 were logged by the start that wrote the damaged checkpoint, and again now
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    ref = {r["step"]: r["loss"] for r in ref_metrics if "loss" in r}
    assert all(r["loss"] == pytest.approx(ref[r["step"]], rel=1e-6) for r in records if "loss" in r)


def _old_rng(state):
    """A rank's random states as the code before weights_only=True wrote them: NumPy's as
    ``np.random.get_state()`` returns it (a tuple holding a uint32 array)."""
    n = state["numpy"]
    return {**state, "numpy": (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])}


@pytest.mark.slow
def test_a_checkpoint_written_before_weights_only_resumes_exactly(tmp_path, tiny_demo, uninterrupted):
    ref_weights, ref_metrics = uninterrupted
    assert train(tiny_recipe(tmp_path, tiny_demo, "old", **SMALL, **{"train.stop_after_steps": 2})).step == 2
    path = tmp_path / "runs" / "old" / "checkpoint-00000002.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "rng": [_old_rng(r) for r in state["rng"]]}, path)  # rewritten the old way
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)

    resumed = train(tiny_recipe(tmp_path, tiny_demo, "old", **SMALL))

    assert resumed.step == 6
    for name, a in ref_weights.items():
        assert torch.equal(a, resumed.model.state_dict()[name]), name
    ref = {r["step"]: r["loss"] for r in ref_metrics if "loss" in r}
    records = [r for r in read_metrics(tmp_path / "runs" / "old") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == pytest.approx(ref[r["step"]], rel=1e-6) for r in records)


@pytest.mark.slow
def test_no_intact_checkpoint_names_each_and_changes_nothing(tmp_path, tiny_demo):
    run_dir = _cut_twice(tmp_path, tiny_demo, "broken")
    (run_dir / "checkpoint-00000004.pt").write_bytes(b"")
    older = run_dir / "checkpoint-00000002.pt"
    older.write_bytes(older.read_bytes()[:1000])
    with pytest.raises(TrainingError) as err:
        train(tiny_recipe(tmp_path, tiny_demo, "broken", **SMALL))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no intact checkpoint to resume from in {run_dir}")
    assert "checkpoint-00000004.pt: empty (0 bytes)" in message
    assert "checkpoint-00000002.pt: truncated (not a complete zip archive)" in message
    assert [p.name for p in ckpt.checkpoints(run_dir)] == ["checkpoint-00000004.pt", "checkpoint-00000002.pt"]
    with pytest.raises(TrainingError, match="already holds checkpoint-00000004.pt"):  # --no-resume as before
        train(tiny_recipe(tmp_path, tiny_demo, "broken", **SMALL), resume=False)


def test_every_rank_loads_rank_0s_choice(tmp_path):
    good = _checkpoint(tmp_path / "checkpoint-00000002.pt")
    (tmp_path / "checkpoint-00000004.pt").write_bytes(b"")
    rank0 = FakeEngine(0, 2)
    path, state = ckpt.resume_checkpoint(rank0, tmp_path, None)
    assert path == good and state["step"] == 1
    assert rank0.sent["resume_checkpoint"] == (str(good), None)
    rank1 = FakeEngine(1, 2, {"resume_checkpoint": [(str(good), None), None]})
    assert ckpt.resume_checkpoint(rank1, tmp_path / "not-looked-at", None) == (good, None)
    refused = FakeEngine(1, 2, {"resume_checkpoint": [(None, "--resume: no checkpoint in x"), None]})
    with pytest.raises(TrainingError, match="--resume: no checkpoint in x"):
        ckpt.resume_checkpoint(refused, tmp_path, True)


# ---------------------------------------------------------------- writing checkpoints


@pytest.mark.slow
def test_stale_temporary_file_is_removed_at_start(tmp_path, tiny_demo):
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    stale = run_dir / ".checkpoint-k1ll3d.tmp"  # what kill -9 during a write leaves
    stale.write_bytes(b"\0" * 100_000)
    assert train(tiny_recipe(tmp_path, tiny_demo, "stale", **SMALL, **{"train.stop_after_steps": 1})).step == 1
    assert not list(run_dir.glob(".checkpoint-*"))
    assert f"removed {stale}" in (run_dir / "train.log").read_text()


def _disk_full(monkeypatch):
    """Checkpoint writes go to /dev/full: the kernel answers ENOSPC, as on a full disk (the same
    patch the CLI tests install in the child process, :data:`SITECUSTOMIZE`)."""
    monkeypatch.setattr(builtins, "open", builtins.open)  # restored after the test
    exec(SITECUSTOMIZE, {})


STATE = {"model": {"w": torch.zeros(500_000)}, "step": 5}  # 2 MB: more than a write buffer


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    previous = ckpt.save_checkpoint({"model": {}, "step": 4}, tmp_path, 4)
    _disk_full(monkeypatch)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.save_checkpoint(STATE, tmp_path, 5)
    assert str(err.value) == (f"cannot write checkpoint {tmp_path / 'checkpoint-00000005.pt'}: no space left on "
                              f"device; the previous checkpoint checkpoint-00000004.pt is intact")
    assert isinstance(err.value, TrainingError)
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]  # no temporary file, no step 5
    assert ckpt.load_checkpoint(previous)["step"] == 4


@pytest.mark.parametrize("free, cause", [(0, "no space left on device"),
                                         (10 * 2**30, "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")])
def test_torch_runtime_error_on_write_is_told_by_the_free_space(tmp_path, monkeypatch, free, cause):
    ckpt.save_checkpoint({"model": {}, "step": 4}, tmp_path, 4)

    def save(obj, f, *args, **kwargs):  # torch.save that wrote a part, then failed as on a full disk
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\n"
                           "frame #0: c10::ThrowEnforceNotMet(...)")

    monkeypatch.setattr(ckpt.torch, "save", save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free, free))
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.save_checkpoint(STATE, tmp_path, 5)
    assert str(err.value) == (f"cannot write checkpoint {tmp_path / 'checkpoint-00000005.pt'}: {cause}; "
                              f"the previous checkpoint checkpoint-00000004.pt is intact")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000004.pt"]


def test_a_failed_write_stops_every_rank_with_rank_0s_line(tmp_path, monkeypatch):
    from tsmtrain.recipe import Recipe

    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(
        ckpt.CheckpointWriteError("cannot write checkpoint x: no space left on device")))
    model = torch.nn.Linear(2, 2)

    class Step:
        def state_dict(self):
            return None

    recipe = Recipe.model_validate({"data": {"train_list": "t.txt"}, "model": {"num_classes": 2}})
    rank0 = FakeEngine(0, 2)
    with pytest.raises(TrainingError, match="^cannot write checkpoint x: no space left on device$"):
        ckpt.save_run_checkpoint(rank0, tmp_path, model, torch.optim.SGD(model.parameters(), 0.1), Step(),
                                 ckpt.Position(step=5), None, recipe)
    assert rank0.sent["checkpoint_written"] == "cannot write checkpoint x: no space left on device"
    rank1 = FakeEngine(1, 2, {"checkpoint_written": [rank0.sent["checkpoint_written"], None]})
    with pytest.raises(TrainingError, match="^cannot write checkpoint x: no space left on device$"):
        ckpt.save_run_checkpoint(rank1, tmp_path, model, None, None, ckpt.Position(step=5), None, recipe)
    assert rank1.sent["checkpoint_written"] is None  # and FakeEngine.barrier was never needed


SITECUSTOMIZE = '''
import builtins, os
_real = builtins.open
def _full(file, mode="r", *args, **kwargs):  # checkpoint writes go to /dev/full (ENOSPC), as on a full disk
    f = _real(file, mode, *args, **kwargs)
    if "w" in mode and os.path.basename(str(file)).startswith(".checkpoint-"):  # tsmtrain.io's temporary file
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, f.fileno())
        os.close(full)
    return f
builtins.open = _full
'''


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["none", "ddp"])
def test_full_disk_through_the_cli(tmp_path, tiny_demo, engine):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    ranks = 1 if engine == "none" else 2
    name = f"full-{engine}"
    path = recipe_file(tmp_path / f"{name}.yaml", tiny_demo, name, dist={"engine": engine, "np": ranks},
                       data={"input_size": 8, "num_segments": 2, "workers": 0},
                       schedule={"epochs": 1, "warmup_epochs": 0}, train={"batch_size": 4 // ranks})
    first_run = ("run", path, "--set", "train.stop_after_steps=1")  # one process: no launcher, so in this one
    first = run_cli(*first_run) if ranks == 1 else cli("-m", "tsmtrain", *first_run)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / name
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)  # in every rank the launcher starts
    env = venv_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    proc = cli("-m", "tsmtrain", "run", path, "--set", "train.stop_after_steps=2", env=env)
    assert proc.returncode != 0 and (engine != "none" or proc.returncode == 2), proc.stderr[-3000:]
    assert "tsmtrain/train" not in proc.stderr and "unexpected pos" not in proc.stderr, proc.stderr[-3000:]
    want = (f"error: cannot write checkpoint {run_dir / 'checkpoint-00000002.pt'}: no space left on device; "
            f"the previous checkpoint checkpoint-00000001.pt is intact")
    if engine == "none":
        assert "Traceback" not in proc.stderr and error_lines(proc.stderr) == [want], proc.stderr[-3000:]
    else:  # every rank says it (their lines may interleave)
        assert proc.stderr.count(want) == ranks, proc.stderr[-3000:]
    assert not list(run_dir.glob(".checkpoint-*"))
    assert [p.name for p in ckpt.checkpoints(run_dir)] == ["checkpoint-00000001.pt"]
    assert ckpt.load_checkpoint(run_dir / "checkpoint-00000001.pt")["step"] == 1


# ---------------------------------------------------------------- metrics.jsonl


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 3, "val_top1": 50.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # killed mid-write
    assert truncate_metrics(path, 3) == 3  # steps 4 and 5, and the line cut short
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3] + records[-1:]
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    inode = path.stat().st_ino
    assert truncate_metrics(path, 3) == 0 and path.stat().st_ino == inode  # nothing to drop: not rewritten
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def test_truncate_metrics_on_a_fresh_start_drops_everything(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n')  # a start killed before a checkpoint
    assert truncate_metrics(path, 0) == 2 and path.read_text() == ""
