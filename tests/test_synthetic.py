import decord
import numpy as np
import pytest

from tsmtrain.prep.synthetic import generate_demo_dataset, render_clip


@pytest.mark.parametrize("pair", [0, 1, 2])
def test_second_class_of_a_pair_is_the_first_reversed(pair):
    a = render_clip(2 * pair, np.random.default_rng(7), frames=8, size=32)
    b = render_clip(2 * pair + 1, np.random.default_rng(7), frames=8, size=32)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(b, a[::-1])
    assert not np.array_equal(a[0], a[-1])  # something does change over time


def centroid_x(clip):
    bright = clip.mean(-1) > 120
    return np.array([np.nonzero(f)[1].mean() for f in bright])


def test_frames_alike_but_order_differs():
    rng0, rng1 = np.random.default_rng(1), np.random.default_rng(2)
    left = [render_clip(0, rng0, 8, 32) for _ in range(200)]
    right = [render_clip(1, rng1, 8, 32) for _ in range(200)]
    mean_left = np.mean([c.mean(0) for c in left], axis=0)
    mean_right = np.mean([c.mean(0) for c in right], axis=0)
    assert np.abs(mean_left - mean_right).mean() < 6  # time-averaged images look alike (object contrast ~150)
    motion_left = [np.sign(centroid_x(c)[-1] - centroid_x(c)[0]) for c in left]
    motion_right = [np.sign(centroid_x(c)[-1] - centroid_x(c)[0]) for c in right]
    assert np.mean(motion_left) == 1 and np.mean(motion_right) == -1  # the arrow of time separates them


def test_generate_lists_and_videos(tmp_path):
    train, val = generate_demo_dataset(tmp_path, num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=32)
    rows = [line.split() for line in train.read_text().splitlines()]
    assert len(rows) == 12 and sorted({int(r[1]) for r in rows}) == [0, 1, 2, 3]
    assert len(val.read_text().splitlines()) == 8
    vr = decord.VideoReader(str(tmp_path / rows[0][0]))
    assert len(vr) == 8 and vr[0].shape == (32, 32, 3)
    stamp = (tmp_path / rows[0][0]).stat().st_mtime_ns
    generate_demo_dataset(tmp_path, num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=32)
    assert (tmp_path / rows[0][0]).stat().st_mtime_ns == stamp  # second call is a no-op


def test_invalid_class_counts(tmp_path):
    with pytest.raises(ValueError, match="even"):
        generate_demo_dataset(tmp_path, num_classes=3)
    with pytest.raises(ValueError):
        render_clip(6, np.random.default_rng(0))


@pytest.mark.parametrize("pair", range(6))
def test_study_second_class_of_a_pair_is_the_first_reversed(pair):
    from tsmtrain.prep.synthetic import render_study_clip

    a = render_study_clip(2 * pair, np.random.default_rng(5), frames=8, size=32)
    b = render_study_clip(2 * pair + 1, np.random.default_rng(5), frames=8, size=32)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(b, a[::-1])  # distractors and noise included
    assert not np.array_equal(a[0], a[-1])


def test_study_clips_have_noise_and_distractors():
    from tsmtrain.prep.synthetic import render_study_clip

    clean = render_study_clip(4, np.random.default_rng(3), frames=8, size=32, distractors=0, noise=0)
    noisy = render_study_clip(4, np.random.default_rng(3), frames=8, size=32, distractors=0, noise=20)
    assert 10 < np.std(noisy.astype(float) - clean.astype(float)) < 30
    crowded = render_study_clip(4, np.random.default_rng(3), frames=8, size=32, distractors=3, noise=0)
    bright = lambda c: (c.mean(-1) > 140).sum()  # noqa: E731  (the turning bar alone vs with 3 more objects)
    assert bright(crowded) > bright(clean)
    with pytest.raises(ValueError, match="outside 0..11"):
        render_study_clip(12, np.random.default_rng(0))
    with pytest.raises(ValueError, match="negative"):
        render_study_clip(0, np.random.default_rng(0), noise=-1)


def test_generate_study_lists_and_videos(tmp_path):
    from tsmtrain.prep.synthetic import generate_study_dataset

    train, val = generate_study_dataset(tmp_path, num_classes=12, train_per_class=1, val_per_class=1, frames=8)
    rows = [line.split() for line in train.read_text().splitlines()]
    assert len(rows) == 12 and sorted({int(r[1]) for r in rows}) == list(range(12))
    assert len(val.read_text().splitlines()) == 12
    vr = decord.VideoReader(str(tmp_path / rows[0][0]))
    assert len(vr) == 8 and vr[0].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="even"):
        generate_study_dataset(tmp_path, num_classes=14)
