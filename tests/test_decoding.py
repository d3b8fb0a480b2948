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
    with pytest.raises(ValueError, match="torchcodec.*decord"):
        decode_frames(grey_video, [0], backend="pyav")
    with pytest.raises(ValueError, match="torchcodec.*decord"):
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


# ---------------------------------------------------------------- decoding at the target size


def _resize_after(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference: full-size frames resized on the CPU afterwards (bilinear, antialiased)."""
    import torch
    from torchvision.transforms.v2.functional import resize

    t = torch.from_numpy(frames).permute(0, 3, 1, 2)
    return resize(t, list(size), antialias=True).permute(0, 2, 3, 1).numpy()


# Mean absolute difference in 0..255 levels allowed between decoder-side resizing and resizing
# full frames afterwards. torchcodec's Resize is torchvision's bilinear antialiased resize inside
# FFmpeg's filter graph (measured: 0.1 on these clips); decord resizes with FFmpeg's swscale
# (bicubic, measured: about 1). A neighbouring frame differs by far more (checked below).
RESIZE_TOLERANCE = {"torchcodec": 0.5, "decord": 2.0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, size", [("moviepy_chaplin.mp4", (128, 170)), ("mmaction2_test.mp4", (112, 112))])
def test_decoder_side_resize_matches_resize_after(backend, name, size):
    _require_backend(backend)
    path = _clip(name)
    n = num_frames(path, backend)
    indices = [3, n // 3, n // 2, n - 2]
    full = decode_frames(path, indices, backend)
    small = decode_frames(path, indices, backend, size=size)
    assert small.shape == (len(indices), *size, 3)
    assert small.dtype == np.uint8
    ref = _resize_after(full, size).astype(np.float64)
    err = np.abs(small.astype(np.float64) - ref).reshape(len(indices), -1).mean(axis=1)
    assert err.max() < RESIZE_TOLERANCE[backend], err
    # the tolerance is far below what one frame off would cost
    other = _resize_after(decode_frames(path, [n // 2 + 12], backend), size).astype(np.float64)
    assert np.abs(other[0] - ref[2]).mean() > 4 * RESIZE_TOLERANCE[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_size_is_a_value_error(grey_video, backend):
    _require_backend(backend)
    with pytest.raises(ValueError, match="height, width"):
        open_video(grey_video, backend, size=(0, 16))
    with pytest.raises(ValueError, match="height, width"):
        open_video(grey_video, backend, size=(16,))


def test_torchcodec_is_the_default_backend(grey_video):
    _require_backend("torchcodec")
    assert open_video(grey_video).backend == "torchcodec"


def test_approximate_seek_on_a_constant_frame_rate_file(grey_video):
    """A CFR file starting at pts 0 (what tsmtrain prepare writes): approximate == exact."""
    _require_backend("torchcodec")
    indices = [17, 3, 0, 24, 11]
    exact = decode_frames(grey_video, indices, "torchcodec", seek_mode="exact")
    approximate = decode_frames(grey_video, indices, "torchcodec", seek_mode="approximate")
    np.testing.assert_array_equal(exact, approximate)
    with pytest.raises(ValueError, match="seek mode"):
        open_video(grey_video, "torchcodec", seek_mode="fast")


def test_choose_seek_mode():
    from tsmtrain.data.decoding import choose_seek_mode

    assert choose_seek_mode("auto", prepared=True) == "approximate"
    assert choose_seek_mode("auto", prepared=False) == "exact"
    assert choose_seek_mode("exact", prepared=True) == "exact"
    assert choose_seek_mode("approximate", prepared=False) == "approximate"
    with pytest.raises(ValueError, match="seek mode"):
        choose_seek_mode("sometimes", prepared=True)


def test_frames_returns_a_tensor_on_the_decoders_device(grey_video):
    _require_backend("torchcodec")
    import torch

    video = open_video(grey_video, "torchcodec", size=(24, 32))
    frames = video.frames([4, 1])
    assert isinstance(frames, torch.Tensor) and frames.device.type == "cpu"
    assert frames.shape == (2, 24, 32, 3) and frames.dtype == torch.uint8
    np.testing.assert_array_equal(frames.numpy(), video.get([4, 1]))


def test_decord_refuses_a_gpu(grey_video):
    _require_backend("decord")
    with pytest.raises(ValueError, match="CPU only"):
        open_video(grey_video, "decord", device="cuda")
