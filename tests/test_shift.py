import pytest
import torch
from torchvision.models.resnet import BasicBlock

from tsmtrain.models.shift import TemporalShift, temporal_shift


def test_shift_matches_hand_computed_example():
    # 1 clip, T=3 frames, C=4 channels, 1x1 pixels, shift_div=4 -> fold=1
    x = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]).view(3, 4, 1, 1)
    out = temporal_shift(x, num_segments=3, shift_div=4).view(3, 4)
    expected = torch.tensor(
        [
            [5.0, 0, 3, 4],  # ch0 from frame 1; ch1 from frame -1 (zero pad)
            [9.0, 2, 7, 8],  # ch0 from frame 2; ch1 from frame 0
            [0.0, 6, 11, 12],  # ch0 past the end (zero); ch1 from frame 1
        ]
    )
    assert torch.equal(out, expected)


def test_shift_keeps_clips_apart_and_input_untouched():
    x = torch.randn(2 * 4, 16, 3, 3)
    before = x.clone()
    out = temporal_shift(x, 4, 8).view(2, 4, 16, 3, 3)
    assert torch.equal(x, before)
    # first frame of clip 1 must not receive anything from clip 0's last frame
    assert torch.all(out[1, 0, 2:4] == 0)
    assert torch.equal(out[:, :, 4:], x.view(2, 4, 16, 3, 3)[:, :, 4:])


def test_shift_fraction_follows_shift_div():
    x = torch.ones(4, 64, 1, 1)
    out = temporal_shift(x, 4, 8).view(4, 64)
    # frame 0 loses the channels coming from frame -1: exactly 64/8 zeros
    assert int((out[0] == 0).sum()) == 8
    assert int((out[3] == 0).sum()) == 8
    assert int((out[1] == 0).sum()) == 0


def test_gradcheck():
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, 3, 4), (x,))


def test_bad_leading_dimension():
    with pytest.raises(ValueError, match="multiple of num_segments"):
        temporal_shift(torch.zeros(5, 8, 1, 1), 4)


def test_residual_placement_leaves_identity_path_unshifted():
    torch.manual_seed(0)
    block = BasicBlock(8, 8).eval()
    shifted = BasicBlock(8, 8).eval()
    shifted.load_state_dict(block.state_dict())
    shifted.conv1 = TemporalShift(shifted.conv1, num_segments=4, shift_div=4)
    x = torch.randn(4, 8, 5, 5)
    # residual branch of the shifted block equals the plain branch on shifted input
    def branch(b, inp):
        return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(inp)))))
    out = shifted(x)
    expected = torch.relu(branch(block, temporal_shift(x, 4, 4)) + x)  # identity adds the *unshifted* x
    assert torch.allclose(out, expected, atol=1e-6)
    wrong = torch.relu(branch(block, temporal_shift(x, 4, 4)) + temporal_shift(x, 4, 4))
    assert not torch.allclose(out, wrong, atol=1e-3)
