import pytest
import torch
from torchvision.models.resnet import BasicBlock

from tsmtrain.models import shift as shift_module
from tsmtrain.models.shift import TemporalShift, native_shift, temporal_shift

PATHS = ["native", "function", "compile"]  # the C++ operator, the autograd Function, what torch.compile traces


def use_path(path, monkeypatch):
    """Make temporal_shift take one implementation: the native operator on CPU (the default),
    the PyTorch autograd Function (no native operator), or the torch.compile code run eagerly."""
    if path == "native" and native_shift() is None:
        pytest.skip("the native temporal-shift operator could not be built here (see the warning logged)")
    if path == "function":
        monkeypatch.setattr(shift_module, "_native", False)
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


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


@pytest.mark.parametrize("path", PATHS[:2])
def test_bad_leading_dimension(path, monkeypatch):
    use_path(path, monkeypatch)
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("t,c,shift_div", [(8, 64, 8), (3, 12, 4), (4, 10, 3), (1, 8, 2), (2, 7, 8), (2, 512, 8),
                                           (3, 100, 8)])
def test_function_equals_reference_bitwise(t, c, shift_div, channels_last, path, monkeypatch):
    use_path(path, monkeypatch)
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


@pytest.mark.parametrize("path", PATHS[:2])  # under torch.compile, inductor chooses the layouts
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_output_and_gradient_keep_the_memory_format(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    x = torch.randn(8, 16, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    out = temporal_shift(x, 4, 8)
    assert out.is_contiguous(memory_format=fmt)
    out.backward(torch.ones_like(out))  # ones_like keeps the format
    assert x.grad.is_contiguous(memory_format=fmt)


def test_every_output_element_is_written(monkeypatch):
    # the output starts from torch.empty_like: make "uninitialised" NaN, then none may be left
    use_path("function", monkeypatch)
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))
    x = torch.randn(6, 8, 3, 3, requires_grad=True)
    out = temporal_shift(x, 3, 4)
    out.backward(torch.randn_like(out))
    assert not out.isnan().any() and not x.grad.isnan().any()


@pytest.mark.parametrize("path", PATHS)
def test_expanded_gradient_and_a_view_as_input(path, monkeypatch):
    use_path(path, monkeypatch)
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


@pytest.mark.parametrize("path", PATHS)
def test_gradgradcheck(path, monkeypatch):
    use_path(path, monkeypatch)
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: temporal_shift(t, 3, 4), (x,))


@pytest.mark.parametrize("path", PATHS)
def test_runs_under_autocast_in_the_input_dtype(path, monkeypatch):
    use_path(path, monkeypatch)
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


@pytest.mark.parametrize("path", PATHS[:2])
def test_non_4d_input_is_refused(path, monkeypatch):
    use_path(path, monkeypatch)
    with pytest.raises(ValueError, match=r"\(N\*T, C, H, W\)"):
        temporal_shift(torch.zeros(4, 8, 2), 4)


def native_operator():
    """torch.ops.tsmtrain.temporal_shift(x, num_segments, fold, reverse), or a skip."""
    if native_shift() is None:
        pytest.skip("the native temporal-shift operator could not be built here (see the warning logged)")
    return torch.ops.tsmtrain.temporal_shift


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                                   torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_native_operator_equals_the_function_in_every_dtype(dtype, reverse, fmt):
    op = native_operator()
    for c in (16, 48, 80, 2048):  # folds 2 (the generic loop), 6, 10 and 256 (a compile-time run length)
        x = (torch.randn(12, c, 3, 2) * 50).to(dtype).contiguous(memory_format=fmt)
        ref = shift_module._TemporalShift.apply(x, 4, c // 8, reverse)
        out = op(x, 4, c // 8, reverse)
        assert torch.equal(out, ref) and out.stride() == ref.stride() and out.dtype == dtype


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,t,fold", [((15, 24, 37, 41), 5, 3), ((16, 64, 28, 28), 8, 8), ((6, 7, 101, 53), 3, 1)])
def test_native_operator_split_over_threads(shape, t, fold, fmt):
    # more than 32768 elements: the output is split over 2 threads by element, and a thread's
    # range begins and ends inside a frame (contiguous) or a pixel (channels_last)
    op = native_operator()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        for reverse in (False, True):
            ref = shift_module._TemporalShift.apply(x, t, fold, reverse)
            assert torch.equal(op(x, t, fold, reverse), ref)
    finally:
        torch.set_num_threads(threads)


def test_native_operator_records_a_graph_node_only_for_a_gradient():
    native_operator()
    x = torch.randn(8, 16, 2, 2)
    assert temporal_shift(x, 4, 8).grad_fn is None
    with torch.no_grad():
        assert temporal_shift(x.requires_grad_(), 4, 8).grad_fn is None
    out = temporal_shift(x, 4, 8)
    assert out.requires_grad and "TemporalShift" in out.grad_fn.name()


def test_native_operator_is_built_where_a_compiler_and_ninja_are():
    # setup.sh installs g++ and ninja: there the build must succeed, never fall back in silence
    import shutil
    if not (shutil.which("c++") and shutil.which("ninja")):
        pytest.skip("no C++ compiler or ninja on this machine: the PyTorch shift is used")
    assert native_shift() is not None
    x = torch.randn(8, 16, 2, 2, requires_grad=True)
    out = temporal_shift(x, 4, 8)
    assert "TemporalShift" in out.grad_fn.name()


def test_native_operator_can_be_switched_off():
    import subprocess
    import sys
    code = ("import torch; from tsmtrain.models.shift import native_shift, temporal_shift; "
            "x = torch.randn(8, 16, 2, 2, requires_grad=True); "
            "print(native_shift() is None, type(temporal_shift(x, 4, 8).grad_fn).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TSMTRAIN_NATIVE_SHIFT": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "_TemporalShiftBackward"]
