"""Optical flow (tsmtrain.data.flow): quantization, storage read back by index, the direction of
the flow of a rendered moving square, and `tsmtrain prepare --flow` (verified, resumable)."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from tests.conftest import make_video
from tests.test_prepare import _cli, _run
from tsmtrain.data import flow as F
from tsmtrain.prep import flow_files as FF
from tsmtrain.data.manifest import MANIFEST, JOURNALS_DIR
from tsmtrain.prep.encode import PrepareError, Settings, check_options

cv2 = pytest.importorskip("cv2")


def test_quantization_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    flow = rng.uniform(-30, 30, size=(3, 8, 8, 2)).astype(np.float32)
    q = F.quantize_flow(flow, 20)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255  # clipped at the bound
    back = F.dequantize_flow(q, 20)
    inside = np.abs(flow) <= 20
    assert F.quantization_error(20) == pytest.approx(20 / 255)
    assert np.abs(back - flow)[inside].max() <= F.quantization_error(20) + 1e-5
    assert np.allclose(back[~inside], np.sign(flow[~inside]) * 20, atol=1e-4)
    assert F.quantize_flow(np.zeros(1), 20)[0] in (127, 128) and F.dequantize_flow(np.array([0, 255]), 20).tolist() \
        == pytest.approx([-20, 20])


def test_write_then_read_by_index_is_lossless(tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    pytest.importorskip("torchcodec")
    rng = np.random.default_rng(1)
    flow = rng.normal(0, 6, size=(7, 24, 40, 2)).astype(np.float32)
    q = F.quantize_flow(flow)
    path = tmp_path / "x.flow.mkv"
    FF.write_flow(path, q, fps="30000/1001")
    assert F.flow_frames(path) == 7
    got = F.read_flow(path, [6, 0, 3, 3])
    assert got.shape == (4, 24, 40, 2) and got.dtype == np.uint8
    assert np.array_equal(got, q[[6, 0, 3, 3]])  # x and y not mixed, nothing lost
    clipped = np.clip(flow[[6, 0, 3, 3]], -F.DEFAULT_BOUND, F.DEFAULT_BOUND)
    assert np.abs(F.dequantize_flow(got) - clipped).max() <= F.quantization_error() + 1e-5
    with pytest.raises(F.FlowError):
        F.read_flow(path, [7])


def _moving_square(frames=4, dx=2, dy=1):
    """64x64 RGB: a bright checked square moving (dx, dy) pixels per frame on a textured background."""
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur((rng.random((64, 64)) * 120).astype(np.uint8), (0, 0), 1.0)
    square = np.full((16, 16), 230, np.uint8)
    square[::4, :] = square[:, ::4] = 160
    out = []
    for t in range(frames):
        f = background.copy()
        y, x = 20 + dy * t, 16 + dx * t
        f[y:y + 16, x:x + 16] = square
        out.append(np.repeat(f[..., None], 3, -1))
    return np.stack(out)


@pytest.mark.parametrize("method", ["dis", "farneback", "tvl1"])
def test_flow_of_a_moving_square_points_the_way_it_moves(method):
    frames = _moving_square()
    flow = F.compute_flow(frames, method)
    assert flow.shape == (3, 64, 64, 2) and flow.dtype == np.float32
    for t in range(3):
        y, x = 20 + t, 16 + 2 * t
        inner = flow[t, y + 4:y + 12, x + 4:x + 12]
        assert 1.0 < np.median(inner[..., 0]) < 3.0, (method, t, np.median(inner[..., 0]))  # right, ~2 px
        assert 0.4 < np.median(inner[..., 1]) < 1.6, (method, t, np.median(inner[..., 1]))  # down, ~1 px
    still = flow[:, 50:, 50:]  # background corner the square never reaches
    assert np.abs(np.median(still, axis=(1, 2))).max() < 0.3


def test_bad_flow_options_and_shards_are_refused():
    with pytest.raises(PrepareError) as err:
        check_options(None, ["a.txt"], "root", None, False, None,
                      Settings(flow="raft", flow_bound=0), tar_shards=False)
    assert any("--flow 'raft'" in p for p in err.value.problems)
    assert any("--flow-bound 0" in p for p in err.value.problems)
    with pytest.raises(PrepareError, match="--flow with --shards is not supported yet"):
        check_options(None, ["a.txt"], "root", None, False, None, Settings(flow="dis"), tar_shards=True)
    assert "flow" not in Settings().key()  # old records (before flow) still count as done
    assert Settings(flow="dis").key()["flow"] == "dis"


@pytest.fixture(scope="module")
def flow_sources(tmp_path_factory):
    pytest.importorskip("torchcodec")
    root = tmp_path_factory.mktemp("flow_sources")
    for i in range(3):
        make_video(root / f"v{i}.mp4", frames=10 + 3 * i, size=48)
    make_video(root / "one.mp4", frames=1, size=48)  # a video, but no pair of frames
    (root / "bad.mp4").write_bytes(b"not a video at all" * 10)
    (root / "train.txt").write_text("v0.mp4 0\nbad.mp4 1\nv1.mp4 1\none.mp4 0\nv2.mp4 0\n")
    return root


def _prepare(root, out, *extra):
    return _run("prepare", "--list", root / "train.txt", "--root", root, "--out", out, "--flow", "dis",
                "--jobs", 2, *extra)


def test_prepare_with_flow_stores_verified_flow_beside_each_video(flow_sources, tmp_path):
    out = tmp_path / "out"
    _, err = _prepare(flow_sources, out)
    assert "3 prepared, 2 failed" in err and "optical flow:" in err and "s per video" in err
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    by_name = {os.path.basename(r["source"]): r for r in records}
    assert by_name["bad.mp4"]["status"] == "failed" and by_name["bad.mp4"]["reason"].startswith("cannot read")
    assert by_name["bad.mp4"]["flow"] is None
    assert by_name["one.mp4"]["status"] == "failed" and by_name["one.mp4"]["flow"] is None
    assert by_name["one.mp4"]["reason"] == "optical flow: needs at least 2 frames; the video has 1"
    for i in range(3):
        r = by_name[f"v{i}.mp4"]
        assert r["status"] == "ok" and r["flow"] == f"v{i}.flow.mkv"
        assert (r["flow_method"], r["flow_preset"], r["flow_bound"]) == ("dis", "medium", 20.0)
        assert r["flow_frames"] == r["frames"] - 1 == 9 + 3 * i
        assert r["flow_seconds"] > 0 and r["flow_bytes"] == (out / r["flow"]).stat().st_size
        assert 0 <= r["flow_mean_error"] <= r["flow_max_error"] <= F.quantization_error(20) + 1e-4
        assert 0 <= r["flow_clipped"] < 1 and r["flow_mean_clip_error"] >= r["flow_mean_error"] - 1e-4
        assert r["settings"]["flow"] == "dis"
        q = F.read_flow(out / r["flow"], [0, r["flow_frames"] - 1])
        assert q.shape == (2, r["height"], r["width"], 2)
        from tsmtrain.data.decoding import open_video

        rgb = open_video(out / r["output"]).get([0, 1])
        expect = F.quantize_flow(F.compute_flow(rgb, "dis", "medium"))[0]
        assert np.abs(q[0].astype(int) - expect).max() <= 1  # the flow of the prepared frames
    assert (out / "train.txt").read_text() == "v0.mp4 0\nv1.mp4 1\nv2.mp4 0\n"
    assert not list(out.rglob(".*part*"))

    _, err = _prepare(flow_sources, out)  # a second run does nothing
    assert "0 prepared, 0 failed, 5 already done" in err
    (out / "v1.flow.mkv").unlink()  # a flow file lost: only that video is done again
    _, err = _prepare(flow_sources, out)
    assert "1 prepared, 0 failed, 4 already done" in err and (out / "v1.flow.mkv").is_file()
    _, err = _prepare(flow_sources, out, "--flow-preset", "fast")  # other flow settings: all again
    assert "3 prepared" in err


@pytest.mark.slow
def test_sigkill_then_restart_gives_the_same_flow(flow_sources, tmp_path):
    reference, out = tmp_path / "ref", tmp_path / "out"
    _prepare(flow_sources, reference)
    child = _cli("prepare", "--list", flow_sources / "train.txt", "--root", flow_sources, "--out", out,
                 "--flow", "dis", "--jobs", 1, start_new_session=True)
    journal = out / JOURNALS_DIR / "manifest-0-of-1.jsonl"
    deadline = time.monotonic() + 120
    while child.poll() is None and not (journal.exists() and b'"status":"ok"' in journal.read_bytes()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert child.poll() is None, "the run finished before it could be killed"
    os.killpg(child.pid, signal.SIGKILL)
    child.communicate()
    _, err = _prepare(flow_sources, out)
    assert " 0 already done" not in err

    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                if p.is_file() and JOURNALS_DIR not in p.parts and p.name != MANIFEST}

    assert files(out) == files(reference)  # videos, flow, frame tables, list files: byte for byte
    assert not list(out.rglob(".*part*"))
