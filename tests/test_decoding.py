"""Tests for tsmtrain.data.decoding with both backends, on synthetic and real videos."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tsmtrain.data.decoding import VideoDecodeError, decode_frames, num_frames, open_video

pytestmark = pytest.mark.video

BACKENDS = ["decord", "torchcodec"]
CLIPS = Path(__file__).parents[1] / ".." / "shared" / "clips"

N_FRAMES = 25
H, W = 48, 64


def grey_level(i: int) -> int:
    return 10 * i


def _require_backend(backend: str) -> None:
    pytest.importorskip("decord" if backend == "decord" else "torchcodec")


@pytest.fixture(scope="module")
def grey_video(tmp_path_factory) -> Path:
    """H.264 (lossless, yuv420p) video of N_FRAMES frames; frame i is solid grey 10*i."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (scripts/setup.sh installs it)")
    path = tmp_path_factory.mktemp("video") / "grey.mp4"
    frames = np.stack([np.full((H, W, 3), grey_level(i), np.uint8) for i in range(N_FRAMES)])
    cmd = [
        "ffmpeg", "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-r", "25", "-i", "-",
        "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", "-g", "5", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_frames(grey_video, backend):
    _require_backend(backend)
    assert num_frames(grey_video, backend) == N_FRAMES
    assert open_video(grey_video, backend).num_frames == N_FRAMES


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_unsorted_repeated_indices(grey_video, backend):
    _require_backend(backend)
    indices = [17, 3, 3, 0, 24, 11, 17, 6]
    frames = decode_frames(grey_video, indices, backend)
    assert frames.dtype == np.uint8
    assert frames.shape == (len(indices), H, W, 3)
    flat = frames.reshape(len(indices), -1).astype(np.float64)
    expected = np.array([grey_level(i) for i in indices], dtype=np.float64)
    np.testing.assert_allclose(flat.mean(axis=1), expected, atol=3)
    # Each frame is uniform (not a mix of neighbouring frames).
    assert (flat.max(axis=1) - flat.min(axis=1)).max() <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_object_reads_several_times(grey_video, backend):
    _require_backend(backend)
    video = open_video(grey_video, backend)
    a = video.get([20, 2])
    b = video.get(np.array([2, 20]))
    np.testing.assert_array_equal(a[::-1], b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_index", [N_FRAMES, N_FRAMES + 100, -1])
def test_out_of_range_index(grey_video, backend, bad_index):
    _require_backend(backend)
    with pytest.raises(VideoDecodeError, match="out of range") as info:
        decode_frames(grey_video, [0, bad_index], backend)
    assert str(grey_video) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    _require_backend(backend)
    path = tmp_path / "does_not_exist.mp4"
    with pytest.raises(VideoDecodeError) as info:
        decode_frames(path, [0], backend)
    assert str(path) in str(info.value)
    with pytest.raises(VideoDecodeError):
        num_frames(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file(tmp_path, backend):
    _require_backend(backend)
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError) as info:
        decode_frames(path, [0], backend)
    assert str(path) in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_unknown_backend(grey_video):
    with pytest.raises(ValueError, match="decord.*torchcodec"):
        decode_frames(grey_video, [0], backend="pyav")
    with pytest.raises(ValueError, match="decord.*torchcodec"):
        num_frames(grey_video, backend="opencv")


# ---------------------------------------------------------------- real clips


def _clip(name: str) -> Path:
    if not CLIPS.is_dir():
        pytest.skip(f"real test clips not found at {CLIPS.resolve()} (shared folder absent)")
    path = CLIPS / name
    if not path.is_file():
        pytest.skip(f"real test clip {path} is missing")
    return path


@pytest.mark.parametrize(
    "name, height, width",
    [
        ("mmaction2_test.mp4", 256, 340),  # H.264
        ("moviepy_bbb_0_30.webm", 720, 1280),  # VP8
        ("mmaction2_test.avi", 240, 320),  # MPEG-4 Part 2
        ("torchcodec_h265.mp4", 128, 128),  # HEVC
    ],
)
def test_real_clips_decord(name, height, width):
    _require_backend("decord")
    path = _clip(name)
    n = num_frames(path, "decord")
    assert n > 8
    indices = np.linspace(0, n - 1, 8).round().astype(int)[::-1]  # descending on purpose
    frames = decode_frames(path, indices, "decord")
    assert frames.shape == (8, height, width, 3)
    assert frames.dtype == np.uint8
    assert frames.std() > 5  # real content, not a blank image


def test_real_clip_backends_agree():
    _require_backend("decord")
    _require_backend("torchcodec")
    path = _clip("mmaction2_test.mp4")
    n_decord = num_frames(path, "decord")
    n_torchcodec = num_frames(path, "torchcodec")
    assert n_decord == n_torchcodec
    indices = [0, 5, 77, 150, n_decord - 1, 40]
    a = decode_frames(path, indices, "decord").astype(np.float64)
    b = decode_frames(path, indices, "torchcodec").astype(np.float64)
    assert a.shape == b.shape == (len(indices), 256, 340, 3)
    per_frame = np.abs(a - b).reshape(len(indices), -1).mean(axis=1)
    # Same frames, only YUV->RGB conversion details differ; a neighbouring frame would
    # differ much more (checked below for contrast).
    assert per_frame.max() < 3, per_frame
    wrong = np.abs(a[2] - decode_frames(path, [90], "torchcodec")[0].astype(np.float64)).mean()
    assert wrong > per_frame.max()


def test_real_clip_unsupported_codec_raises_decode_error():
    # decord 0.6.0's bundled FFmpeg has no AV1 decoder; torchcodec (system FFmpeg) reads it.
    _require_backend("decord")
    path = _clip("torchcodec_av1.mkv")
    with pytest.raises(VideoDecodeError) as info:
        decode_frames(path, [0], "decord")
    assert str(path) in str(info.value)
