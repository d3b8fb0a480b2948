import pytest
import torch
import torchvision

from tsmtrain.models import VideoNet, count_macs, count_parameters
from tsmtrain.models.shift import TemporalShift
from tsmtrain.errors import TrainingError


@pytest.mark.parametrize("arch,blocks", [("resnet18", 8), ("resnet50", 16), ("mobilenet_v2", 10)])
def test_output_shape_and_shift_count(arch, blocks):
    model = VideoNet(arch, num_classes=7, num_segments=4, shift=True).eval()
    out = model(torch.randn(2, 4, 3, 64, 64))
    assert out.shape == (2, 7)
    assert sum(isinstance(m, TemporalShift) for m in model.modules()) == blocks


def test_tsn_has_no_shift_and_same_parameters():
    tsm, tsn = VideoNet("resnet18", 5, 8, shift=True), VideoNet("resnet18", 5, 8, shift=False)
    assert not any(isinstance(m, TemporalShift) for m in tsn.modules())
    assert count_parameters(tsm) == count_parameters(tsn)


def test_consensus_is_average_over_segments():
    model = VideoNet("resnet18", 3, 4, shift=False).eval()
    x = torch.randn(1, 4, 3, 32, 32)
    per_frame = model.fc(model.backbone(x[0]))
    assert torch.allclose(model(x)[0], per_frame.mean(0), atol=1e-5)


def test_tsm_mixes_frames_and_tsn_does_not():
    torch.manual_seed(0)
    for shift, mixes in ((True, True), (False, False)):
        model = VideoNet("resnet18", 3, 4, shift=shift).eval()
        x = torch.randn(1, 4, 3, 32, 32)
        frame_logits = lambda inp, model=model: model.backbone(inp.flatten(0, 1))  # noqa: E731
        y = x.clone()
        y[0, 3] += 1.0  # change only the last frame
        changed = (frame_logits(x) - frame_logits(y)).abs().amax(1)
        assert bool(changed[0] > 1e-6) == mixes  # frame 0 sees frame 3 only through the shift chain


def test_wrong_segment_count():
    model = VideoNet("resnet18", 3, 8)
    with pytest.raises(ValueError, match="8 segments"):
        model(torch.randn(1, 4, 3, 32, 32))


def test_paper_figures_tsm_resnet50():
    model = VideoNet("resnet50", 400, 8, shift=True)
    assert abs(count_parameters(model) / 24.3e6 - 1) < 0.01
    assert abs(count_macs(model, 224) / 33e9 - 1) < 0.03


def test_pretrained_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = VideoNet("resnet18", 10, 4, shift=True, pretrained=path)
    assert torch.equal(model.backbone.layer1[0].conv1.net.weight, ref.layer1[0].conv1.weight)
    assert model.fc.out_features == 10
    torch.save({"bogus": torch.zeros(1)}, path)
    with pytest.raises(TrainingError, match="not weights of a format tsmtrain reads.*bogus"):
        VideoNet("resnet18", 10, 4, pretrained=path)
    state = ref.state_dict()
    del state["layer4.1.bn2.running_var"]
    torch.save(state, path)
    with pytest.raises(TrainingError, match=r"holds no layer4\.1\.bn2\.running_var"):
        VideoNet("resnet18", 10, 4, pretrained=path)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_narrowest_shifted_layer_table_matches_the_network(arch):
    from tsmtrain.recipe import NARROWEST_SHIFTED_LAYER

    model = VideoNet(arch, 4, 4, shift=True)
    widths = []
    for m in model.modules():
        if isinstance(m, TemporalShift):
            first = next(c for c in m.net.modules() if isinstance(c, torch.nn.Conv2d))
            widths.append(first.in_channels)
    assert min(widths) == NARROWEST_SHIFTED_LAYER[arch]


def test_channels_last_model_gives_the_same_logits():
    torch.manual_seed(0)
    model = VideoNet("resnet18", 3, 4, shift=True).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    ref = model(x)
    model.to(memory_format=torch.channels_last)
    frames = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    assert torch.allclose(model(frames), ref, atol=1e-5)
