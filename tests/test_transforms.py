"""Tests for tsmtrain.data.transforms (batched TSN/TSM video augmentation)."""

from __future__ import annotations

import pytest
import torch

from tsmtrain.data.transforms import VideoTransform, crop_params, eval_resize_size

TSM_SCALES = (1.0, 0.875, 0.75, 0.66)
NO_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = x / 255


def random_clips(n=2, t=3, h=40, w=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=g)


def gradient_clips(n, t=2, h=30, w=40):
    """Every frame a horizontal ramp: brightness strictly increases from left to right."""
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8)
    return ramp.view(1, 1, 1, w, 1).expand(n, t, h, w, 3).contiguous()


def orientation(out: torch.Tensor) -> torch.Tensor:
    """+1 where a clip's output is brighter on the right, -1 where brighter on the left."""
    left = out[..., : out.shape[-1] // 4].mean(dim=(1, 2, 3, 4))
    right = out[..., -(out.shape[-1] // 4) :].mean(dim=(1, 2, 3, 4))
    return torch.sign(right - left)


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_dtype_device(train):
    clips = random_clips(n=2, t=3, h=40, w=50)
    out = VideoTransform(train=train, input_size=16)(clips)
    assert out.shape == (2, 3, 3, 16, 16)
    assert out.dtype == torch.float32
    assert out.device == clips.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 3, 30, 50, 3), (2, 3, 50, 30, 3), (1, 1, 8, 8, 3)])
def test_shapes_portrait_landscape_and_upscaling(shape):
    for train in (True, False):
        out = VideoTransform(train=train, input_size=20)(torch.zeros(shape, dtype=torch.uint8))
        assert out.shape == (shape[0], shape[1], 3, 20, 20)


def test_eval_is_deterministic_centre_crop():
    s = 32
    short = eval_resize_size(s)
    assert short == int(32 * 256 / 224) == 36
    # Input 72 x 96: shorter side 72 -> 36, so everything shrinks by 2 and the resized
    # frame is 36 x 48; the centre 32 x 32 crop is rows 2..34, columns 8..40 there, i.e.
    # rows 4..68 and columns 16..80 of the input. Paint exactly that region.
    clips = torch.zeros((2, 3, 72, 96, 3), dtype=torch.uint8)
    clips[:, :, 4:68, 16:80, :] = 200
    t = VideoTransform(train=False, input_size=s, **NO_NORM)
    out = t(clips)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 255))
    # The test can see an off-by-one: shift the painted region by one output pixel
    # (two input pixels) along either axis and the black border shows up.
    for dim in (2, 3):
        shifted = t(clips.roll(2, dims=dim))
        assert shifted.min() < 1 / 255
    # Deterministic, and it does not consume randomness.
    state = torch.get_rng_state()
    torch.testing.assert_close(t(clips), out, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_eval_no_resize_when_shorter_side_already_right():
    # 36 x 48 input, input_size 32: no resize, crop rows 2..34, columns 8..40.
    clips = random_clips(n=1, t=2, h=36, w=48)
    out = VideoTransform(train=False, input_size=32, **NO_NORM)(clips)
    expected = clips[:, :, 2:34, 8:40, :].permute(0, 1, 4, 2, 3).float() / 255
    torch.testing.assert_close(out, expected)


def test_same_crop_for_all_frames_of_a_clip():
    one = random_clips(n=1, t=1, h=48, w=64, seed=3)
    clips = one.expand(12, 4, 48, 64, 3).contiguous()  # 12 identical clips, 4 identical frames
    out = VideoTransform(train=True, input_size=24, generator=torch.Generator().manual_seed(0))(clips)
    for t in range(1, 4):
        torch.testing.assert_close(out[:, t], out[:, 0], rtol=0, atol=0)
    # ... while different clips get different crops/flips.
    distinct = {tuple(out[i, 0].flatten()[:50].tolist()) for i in range(12)}
    assert len(distinct) > 3


def test_flip_off_never_flips():
    t = VideoTransform(train=True, input_size=16, flip=False, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        out = t(gradient_clips(n=32))
        assert (orientation(out) == 1).all()


def test_flip_on_gives_both_orientations():
    t = VideoTransform(train=True, input_size=16, flip=True, generator=torch.Generator().manual_seed(1))
    o = orientation(t(gradient_clips(n=64)))
    assert set(o.tolist()) == {1.0, -1.0}
    assert 16 <= (o == -1).sum() <= 48  # about half
    # Eval never flips.
    assert (orientation(VideoTransform(train=False, input_size=16)(gradient_clips(n=8))) == 1).all()


def test_flipped_clip_is_mirror_image():
    clips = random_clips(n=1, t=2, h=30, w=30).expand(40, 2, 30, 30, 3).contiguous()
    # scales=(1,) on a square frame: the crop is the whole frame, only the flip varies.
    out = VideoTransform(train=True, input_size=30, scales=(1.0,), generator=torch.Generator().manual_seed(0))(clips)
    plain = VideoTransform(train=True, input_size=30, scales=(1.0,), flip=False)(clips[:1])[0]
    for i in range(40):
        assert torch.equal(out[i], plain) or torch.equal(out[i], plain.flip(-1))
    assert any(torch.equal(out[i], plain.flip(-1)) for i in range(40))


def test_crop_params_scales_distort_and_bounds():
    h, w, s = 128, 170, 112
    sizes = [int(min(h, w) * x) for x in TSM_SCALES]  # 128, 112, 96, 84
    g = torch.Generator().manual_seed(0)
    pairs, tops, lefts = set(), {}, {}
    for _ in range(3000):
        top, left, ch, cw = crop_params(h, w, s, TSM_SCALES, g)
        assert ch in sizes and cw in sizes
        assert abs(sizes.index(ch) - sizes.index(cw)) <= 1  # max_distort = 1
        assert 0 <= top and top + ch <= h
        assert 0 <= left and left + cw <= w
        pairs.add((ch, cw))
        tops.setdefault(ch, set()).add(top)
        lefts.setdefault(cw, set()).add(left)
    allowed = {(a, b) for i, a in enumerate(sizes) for j, b in enumerate(sizes) if abs(i - j) <= 1}
    assert pairs == allowed  # all 10 allowed (h, w) pairs occur
    # Positions are uniform over the valid range: both extremes occur for the 84-pixel crops.
    assert min(tops[84]) == 0 and max(tops[84]) == h - 84
    assert min(lefts[84]) == 0 and max(lefts[84]) == w - 84


def test_crop_params_snaps_to_input_size_and_stays_in_bounds():
    g = torch.Generator().manual_seed(0)
    # int(200 * .875) = 175 is within 3 pixels of 176: snapped to 176, as in TSM.
    seen = {crop_params(200, 300, 176, TSM_SCALES, g)[2] for _ in range(500)}
    assert 176 in seen and 175 not in seen
    # Snapping never makes a crop larger than the frame.
    for _ in range(500):
        top, left, ch, cw = crop_params(50, 40, 41, TSM_SCALES, g)
        assert 1 <= ch and top + ch <= 50 and 1 <= cw and left + cw <= 40


@pytest.mark.parametrize("scales", [(), (0.0,), (1.5, 1.0), (-0.5,)])
def test_bad_scales(scales):
    with pytest.raises(ValueError, match="scales"):
        VideoTransform(train=True, scales=scales)


def test_generator_seeding_is_reproducible():
    clips = random_clips(n=6, t=2, h=48, w=64)
    a = VideoTransform(train=True, input_size=24, generator=torch.Generator().manual_seed(123))(clips)
    b = VideoTransform(train=True, input_size=24, generator=torch.Generator().manual_seed(123))(clips)
    c = VideoTransform(train=True, input_size=24, generator=torch.Generator().manual_seed(124))(clips)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # Building a transform draws nothing from the global generator.
    state = torch.get_rng_state()
    VideoTransform(train=True, input_size=24)
    assert torch.equal(torch.get_rng_state(), state)
    # Without a generator, torch's global seed decides.
    torch.manual_seed(7)
    d = VideoTransform(train=True, input_size=24)(clips)
    torch.manual_seed(7)
    e = VideoTransform(train=True, input_size=24)(clips)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_normalisation_maps_mean_to_zero(train):
    mean = (100 / 255, 50 / 255, 200 / 255)
    clips = torch.empty((2, 2, 30, 40, 3), dtype=torch.uint8)
    clips[..., 0], clips[..., 1], clips[..., 2] = 100, 50, 200
    out = VideoTransform(train=train, input_size=16, mean=mean, std=(0.2, 0.3, 0.4))(clips)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)
    # ImageNet defaults: the nearest uint8 value to mean*255 maps to (almost) 0.
    imagenet = torch.tensor([0.485, 0.456, 0.406])
    clips[...] = (imagenet * 255).round().to(torch.uint8)
    out = VideoTransform(train=train, input_size=16)(clips)
    assert out.abs().max() < 0.5 / 255 / 0.224
    # Scale: with mean 0, std 1 the output is x / 255, channel order kept (RGB -> dim 2).
    out = VideoTransform(train=train, input_size=16, **NO_NORM)(clips)
    torch.testing.assert_close(out[0, 0, :, 0, 0], (imagenet * 255).round() / 255)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros((2, 3, 30, 40, 3), dtype=torch.float32),  # wrong dtype
        torch.zeros((3, 30, 40, 3), dtype=torch.uint8),  # missing batch dimension
        torch.zeros((2, 3, 3, 30, 40), dtype=torch.uint8),  # channels first
    ],
)
def test_wrong_input_raises_value_error(bad):
    with pytest.raises(ValueError, match=r"expected uint8 clips of shape \(N, T, H, W, 3\).*got") as info:
        VideoTransform(train=True, input_size=16)(bad)
    assert str(tuple(bad.shape)) in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("train", [True, False])
def test_cuda_matches_cpu(train):
    clips = random_clips(n=4, t=3, h=48, w=64)
    cpu = VideoTransform(train=train, input_size=24, generator=torch.Generator().manual_seed(5))(clips)
    gpu_t = VideoTransform(train=train, input_size=24, generator=torch.Generator().manual_seed(5)).cuda()
    gpu = gpu_t(clips.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-4)
