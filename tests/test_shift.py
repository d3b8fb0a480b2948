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


def reference_shift(x, num_segments, shift_div):
    """The first implementation: fill zeros, then copy three slices (autograd differentiates the copies)."""
    nt, c, h, w = x.shape
    x = x.view(nt // num_segments, num_segments, c, h, w)
    fold = c // shift_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out.view(nt, c, h, w)


@pytest.mark.parametrize("path", ["eager", "compile"])  # the strided writes, and what torch.compile traces
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("t,c,shift_div", [(8, 64, 8), (3, 12, 4), (4, 10, 3), (1, 8, 2), (2, 7, 8)])
def test_function_equals_reference_bitwise(t, c, shift_div, channels_last, path, monkeypatch):
    if path == "compile":  # the code torch.compile traces, run eagerly
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    x = torch.randn(2 * t, c, 5, 6)
    g = torch.randn(2 * t, c, 5, 6)
    if channels_last:
        x, g = (v.contiguous(memory_format=torch.channels_last) for v in (x, g))
    ref_x, new_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, new = reference_shift(ref_x, t, shift_div), temporal_shift(new_x, t, shift_div)
    ref.backward(g)
    new.backward(g)
    assert torch.equal(new, ref)
    assert torch.equal(new_x.grad, ref_x.grad)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_output_and_gradient_keep_the_memory_format(fmt):
    x = torch.randn(8, 16, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    out = temporal_shift(x, 4, 8)
    assert out.is_contiguous(memory_format=fmt)
    out.backward(torch.ones_like(out))  # ones_like keeps the format
    assert x.grad.is_contiguous(memory_format=fmt)


def test_every_output_element_is_written(monkeypatch):
    # the output starts from torch.empty_like: make "uninitialised" NaN, then none may be left
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))
    x = torch.randn(6, 8, 3, 3, requires_grad=True)
    out = temporal_shift(x, 3, 4)
    out.backward(torch.randn_like(out))
    assert not out.isnan().any() and not x.grad.isnan().any()


def test_expanded_gradient_and_a_view_as_input():
    base = torch.randn(3, 8, 16, 2, 2)
    x = base[1].requires_grad_()  # a view with a storage offset
    temporal_shift(x, 4, 8).sum().backward()  # the gradient arrives expanded (stride 0)
    ref = x.detach().clone().requires_grad_()
    reference_shift(ref, 4, 8).sum().backward()
    assert torch.equal(temporal_shift(x, 4, 8), reference_shift(x.detach(), 4, 8))
    assert torch.equal(x.grad, ref.grad)


def test_backward_is_the_opposite_shift():
    x = torch.randn(8, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    temporal_shift(x, 4, 4).backward(g)
    # <shift(x), g> == <x, shift^T(g)>: the gradient is the transpose of the shift
    assert torch.allclose((temporal_shift(x, 4, 4) * g).sum(), (x * x.grad).sum())


def test_gradgradcheck():
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: temporal_shift(t, 3, 4), (x,))


def test_runs_under_autocast_in_the_input_dtype():
    x = torch.randn(8, 16, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = temporal_shift(x, 4, 8)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), temporal_shift(x.float(), 4, 8))


def test_traces_under_torch_compile():
    # aot_eager: Dynamo and AOTAutograd trace the Function, forward and backward, without a C++ compiler
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: temporal_shift(v, 4, 8) * 2, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(a)
    out.sum().backward()
    (temporal_shift(b, 4, 8) * 2).sum().backward()
    assert torch.equal(out, temporal_shift(x, 4, 8) * 2)
    assert torch.equal(a.grad, b.grad)


def test_non_4d_input_is_refused():
    with pytest.raises(ValueError, match=r"\(N\*T, C, H, W\)"):
        temporal_shift(torch.zeros(4, 8, 2), 4)
