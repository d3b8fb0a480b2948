import numpy as np
import pytest

from tsmtrain.data.sampling import segment_indices


def test_eval_takes_segment_centres():
    assert segment_indices(80, 8, train=False).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]


def test_train_one_index_inside_each_segment():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        idx = segment_indices(80, 8, train=True, rng=rng)
        assert len(idx) == 8
        for k, i in enumerate(idx):
            assert 10 * k <= i < 10 * (k + 1)
        seen.add(int(idx[0]))
    assert len(seen) == 10  # every offset of the first segment gets used


@pytest.mark.parametrize("train", [True, False])
def test_short_video_still_gives_t_indices(train):
    idx = segment_indices(3, 8, train=train, rng=np.random.default_rng(1))
    assert len(idx) == 8 and idx.min() >= 0 and idx.max() <= 2
    assert np.all(np.diff(idx) >= 0)
    assert set(idx.tolist()) == {0, 1, 2}


def test_single_frame_video():
    assert segment_indices(1, 8, train=True, rng=np.random.default_rng(0)).tolist() == [0] * 8


def test_invalid():
    with pytest.raises(ValueError):
        segment_indices(0, 8, train=False)
