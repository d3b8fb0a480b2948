"""Self-tests of tests/zoo_reference.py: the reference networks and containers of the official TSM
code and of mmaction2 have the layouts those projects produce (literal keys from their sources,
checkpoint names and converters), and the two references agree with each other and with torchvision."""

import collections
import pickle
import re

import pytest
import torch
import torchvision

from tests import zoo_reference as z


def _clips(n=2, t=4, size=48, seed=3):
    return torch.randn(n, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _naive_shift(x, t, div):
    """out[n, i, c] = x[n, i+1, c] for c < fold, x[n, i-1, c] for fold <= c < 2 fold, else x[n, i, c]."""
    nt, c, h, w = x.shape
    v, out, fold = x.view(nt // t, t, c, h, w), torch.zeros(nt // t, t, c, h, w), c // div
    for n in range(nt // t):
        for i in range(t):
            for ch in range(c):
                src = i + 1 if ch < fold else i - 1 if ch < 2 * fold else i
                if 0 <= src < t:
                    out[n, i, ch] = v[n, src, ch]
    return out.view(nt, c, h, w)


@pytest.mark.parametrize("t,c,div", [(4, 16, 8), (3, 10, 4), (8, 9, 8), (2, 7, 3)])
def test_both_shifts_equal_a_naive_loop(t, c, div):
    x = torch.randn(2 * t, c, 3, 2)
    expected = _naive_shift(x, t, div)
    assert torch.equal(z.TemporalShift.shift(x, t, div), expected)
    assert torch.equal(z.MMTemporalShift.shift(x, t, div), expected)


def test_shift_direction_channel_zero_takes_the_next_frame():
    x = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 8, 1, 1).reshape(4, 8, 1, 1)  # value = frame
    out = z.TemporalShift.shift(x, 4, 8).view(4, 8)
    assert out[:, 0].tolist() == [1, 2, 3, 0] and out[:, 1].tolist() == [0, 0, 1, 2]
    assert out[:, 2].tolist() == [0, 1, 2, 3]


def _official_expected_keys(arch, is_shift):
    """The official TSN's keys derived from torchvision's: base_model. prefix, fc -> new_fc, and
    TemporalShift(conv1) of each block -> conv1.net (ops/temporal_shift.py, blockres)."""
    keys = {}
    for k, v in getattr(torchvision.models, arch)(num_classes=400).state_dict().items():
        if k.startswith("fc."):
            keys["new_fc." + k[3:]] = v.shape
            continue
        if is_shift:
            k = re.sub(r"^(layer\d\.\d+)\.conv1\.", r"\1.conv1.net.", k)
        keys["base_model." + k] = v.shape
    return keys


@pytest.mark.parametrize("arch,count", [("resnet18", 122), ("resnet50", 320)])
@pytest.mark.parametrize("is_shift", [False, True])
def test_official_resnet_keys_and_shapes(arch, count, is_shift):
    sd = z.official_tsn(arch, 400, 8, is_shift).state_dict()
    assert len(sd) == count
    expected = _official_expected_keys(arch, is_shift)
    assert set(sd) == set(expected)
    assert {k: v.shape for k, v in sd.items()} == expected
    assert sd["new_fc.weight"].shape == (400, 512 if arch == "resnet18" else 2048)
    shifted = [k for k in sd if ".net." in k]
    assert len(shifted) == (8 if arch == "resnet18" else 16) * is_shift  # one conv1 per block
    assert ("base_model.layer1.0.conv1.net.weight" in sd) == is_shift
    assert ("base_model.layer1.0.conv1.weight" in sd) != is_shift
    assert "base_model.layer4.1.bn1.running_var" in sd and "base_model.layer2.0.downsample.0.weight" in sd


def test_official_without_dropout_keeps_the_classifier_in_base_model():
    model = z.official_tsn("resnet18", 5, 4, True, dropout=0)
    sd = model.state_dict()
    assert model.new_fc is None and "base_model.fc.weight" in sd and not any(k.startswith("new_fc") for k in sd)
    assert z.official_logits(model, _clips(t=4)).shape == (2, 5)


def test_official_tsn_is_per_frame_torchvision_averaged():
    model = z.official_tsn("resnet18", 6, 3, False)
    tv = torchvision.models.resnet18(num_classes=6).eval()
    sd = {k[len("base_model."):]: v for k, v in model.state_dict().items() if k.startswith("base_model.")}
    sd.update({"fc." + k[len("new_fc."):]: v for k, v in model.state_dict().items() if k.startswith("new_fc.")})
    tv.load_state_dict(sd)
    clips = _clips(t=3)
    with torch.no_grad():
        expected = tv(clips.flatten(0, 1)).view(2, 3, 6).mean(1)
    torch.testing.assert_close(z.official_logits(model, clips), expected, rtol=1e-5, atol=1e-6)


def test_official_mobilenetv2_layout():
    model = z.official_tsn("mobilenetv2", 400, 8, True)
    sd = model.state_dict()
    feats = model.base_model.features
    assert len(feats) == 19 and len(feats[1].conv) == 5 and all(len(feats[i].conv) == 8 for i in range(2, 18))
    shifted = sorted({int(k.split(".")[2]) for k in sd if ".net." in k})
    assert shifted == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    shapes = {"base_model.features.0.0.weight": (32, 3, 3, 3), "base_model.features.1.conv.0.weight": (32, 1, 3, 3),
              "base_model.features.1.conv.3.weight": (16, 32, 1, 1), "base_model.features.2.conv.0.weight": (96, 16, 1, 1),
              "base_model.features.3.conv.0.net.weight": (144, 24, 1, 1),
              "base_model.features.3.conv.3.weight": (144, 1, 3, 3), "base_model.features.17.conv.6.weight": (320, 960, 1, 1),
              "base_model.features.17.conv.7.running_mean": (320,), "base_model.features.18.0.weight": (1280, 320, 1, 1),
              "base_model.features.18.1.weight": (1280,), "new_fc.weight": (400, 1280)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("base_model.classifier") for k in sd)
    # the same network as torchvision's MobileNetV2: same tensors, same parameter count
    official = z.OfficialMobileNetV2(1000)
    tv = torchvision.models.mobilenet_v2()
    assert sum(p.numel() for p in official.parameters()) == sum(p.numel() for p in tv.parameters()) == 3504872
    assert sorted(tuple(v.shape) for v in official.state_dict().values()) == \
        sorted(tuple(v.shape) for v in tv.state_dict().values())


def _official_mbv2_to_torchvision(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace(".net.", ".")
        m = re.match(r"base_model\.features\.(\d+)\.conv\.(\d+)\.(.*)", k)
        if m:
            i, j, rest = int(m[1]), int(m[2]), m[3]
            table = {0: "0.0", 1: "0.1", 3: "1", 4: "2"} if i == 1 else \
                {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}
            out[f"features.{i}.conv.{table[j]}.{rest}"] = v
        elif k.startswith("base_model.features."):
            out[k[len("base_model."):]] = v
        else:
            out["classifier.1." + k.split(".")[-1]] = v
    return out


def test_official_mobilenetv2_forward_equals_torchvision_with_the_same_weights():
    model = z.official_tsn("mobilenetv2", 7, 3, False)
    tv = torchvision.models.mobilenet_v2(num_classes=7).eval()
    tv.load_state_dict(_official_mbv2_to_torchvision(model.state_dict()))
    clips = _clips(t=3, size=64)
    with torch.no_grad():
        expected = tv(clips.flatten(0, 1)).view(2, 3, 7).mean(1)
    torch.testing.assert_close(z.official_logits(model, clips), expected, rtol=1e-4, atol=1e-5)


def _mm_from_torchvision_key(k):
    """mmaction2 ResNetTSM.load_original_weights' rule, inverted: torchvision key -> mmaction2 key."""
    k = re.sub(r"^conv1\.", "conv1.conv.", k)
    k = re.sub(r"^bn1\.", "conv1.bn.", k)
    k = re.sub(r"\.conv(\d)\.", r".conv\1.conv.", k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.bn.", k)
    return "backbone." + k.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")


@pytest.mark.parametrize("arch,count", [("resnet18", 122), ("resnet50", 320)])
def test_mmaction2_resnet_keys(arch, count):
    sd = z.mmaction2_recognizer(arch, 400, 8, True).state_dict()
    assert len(sd) == count
    for k in ("backbone.conv1.conv.weight", "backbone.conv1.bn.running_mean", "backbone.layer1.0.conv1.conv.net.weight",
              "backbone.layer1.0.conv1.bn.weight", "backbone.layer2.0.downsample.conv.weight",
              "backbone.layer2.0.downsample.bn.num_batches_tracked", "cls_head.fc_cls.weight", "cls_head.fc_cls.bias"):
        assert k in sd, k
    assert "data_preprocessor.mean" not in sd and "data_preprocessor.std" not in sd  # persistent=False
    tv = getattr(torchvision.models, arch)().state_dict()
    expected = {re.sub(r"(layer\d\.\d+\.conv1)\.conv\.", r"\1.conv.net.", _mm_from_torchvision_key(k)): v.shape
                for k, v in tv.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in sd.items() if k.startswith("backbone.")} == expected
    tsn = z.mmaction2_recognizer(arch, 400, 8, False).state_dict()
    assert "backbone.layer1.0.conv1.conv.weight" in tsn and not any(".net." in k for k in tsn)


def test_mmaction2_mobilenetv2_keys():
    sd = z.mmaction2_recognizer("mobilenetv2", 400, 8, True).state_dict()
    for k, shape in {"backbone.conv1.conv.weight": (32, 3, 3, 3), "backbone.layer1.0.conv.0.conv.weight": (32, 1, 3, 3),
                     "backbone.layer1.0.conv.1.conv.weight": (16, 32, 1, 1),
                     "backbone.layer2.1.conv.0.net.conv.weight": (144, 24, 1, 1),
                     "backbone.layer2.1.conv.0.net.bn.weight": (144,), "backbone.layer7.0.conv.2.conv.weight": (320, 960, 1, 1),
                     "backbone.conv2.conv.weight": (1280, 320, 1, 1), "cls_head.fc_cls.weight": (400, 1280)}.items():
        assert tuple(sd[k].shape) == shape, k
    shifted = sorted({k.split(".conv.0.net.")[0] for k in sd if ".net." in k})
    assert shifted == ["backbone.layer2.1", "backbone.layer3.1", "backbone.layer3.2", "backbone.layer4.1",
                       "backbone.layer4.2", "backbone.layer4.3", "backbone.layer5.1", "backbone.layer5.2",
                       "backbone.layer6.1", "backbone.layer6.2"]
    assert len(sd) == 314 + 0  # the same tensors as torchvision's MobileNetV2 (fc_cls for classifier)


def _official_to_mm(sd, arch):
    """Official TSN keys -> mmaction2 keys (test-only map), TSM shift kept."""
    out = {}
    shifted_features = {k.split(".")[2] for k in sd if ".net." in k}
    for k, v in sd.items():
        if k.startswith("new_fc."):
            out["cls_head.fc_cls." + k[7:]] = v
            continue
        k = k[len("base_model."):]
        if arch != "mobilenetv2":
            shifted = ".conv1.net." in k
            mk = _mm_from_torchvision_key(k.replace(".net.", "."))
            out[mk.replace(".conv1.conv.", ".conv1.conv.net.") if shifted else mk] = v
            continue
        m = re.match(r"features\.(\d+)\.(?:conv\.)?(\d+)\.(net\.)?(.*)", k)
        i, j, rest = int(m[1]), int(m[2]), m[4]
        net = "net." if m[1] in shifted_features and j < 3 else ""  # mmaction2 wraps the whole ConvModule
        if i == 0 or i == 18:
            out[f"backbone.{'conv1' if i == 0 else 'conv2'}.{'conv' if j == 0 else 'bn'}.{rest}"] = v
            continue
        starts = [1, 2, 4, 7, 11, 14, 17]  # first feature index of each mmaction2 layer
        layer = max(n for n, s in enumerate(starts) if s <= i)
        mod, part = divmod(j, 3)
        out[f"backbone.layer{layer + 1}.{i - starts[layer]}.conv.{mod}.{net}{'conv' if part == 0 else 'bn'}.{rest}"] = v
    return out


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("is_shift", [True, False])
def test_official_and_mmaction2_references_agree_on_the_same_weights(arch, is_shift):
    official = z.official_tsn(arch, 5, 4, is_shift)
    mm = z.mmaction2_recognizer(arch, 5, 4, is_shift, seed=9)
    mm.load_state_dict(_official_to_mm(official.state_dict(), arch))
    clips = _clips(t=4, size=64)
    a, b = z.official_logits(official, clips), z.mmaction2_logits(mm, clips)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (a - z.mmaction2_logits(z.mmaction2_recognizer(arch, 5, 4, is_shift, seed=9), clips)).abs().max() > 1e-3


def test_mmaction2_raw_input_is_normalised_like_torchvision():
    mm = z.mmaction2_recognizer("resnet18", 3, 2, True)
    raw = 255 * torch.rand(1, 2, 3, 32, 32)
    mean, std = torch.tensor(z.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(z.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(z.mmaction2_logits(mm, raw, raw=True), z.mmaction2_logits(mm, (raw / 255 - mean) / std),
                               rtol=1e-4, atol=1e-4)


def test_official_checkpoint_container(tmp_path):
    model = z.official_tsn("resnet18", 10, 8, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / z.official_file_name("resnet18", 8, True)
    assert path.name == "TSM_kinetics_RGB_resnet18_shift8_blockres_avg_segment8_e50.pth"
    z.official_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)  # plain types only
    assert set(ckpt) == {"epoch", "arch", "state_dict", "optimizer", "best_prec1"}
    assert ckpt["arch"] == "resnet18" and ckpt["epoch"] == 50 and ckpt["best_prec1"] == 74.1
    sd = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in sd) and len(sd) == 122
    assert "module.base_model.layer1.0.conv1.net.weight" in sd and "module.new_fc.weight" in sd
    for k, v in before.items():
        assert torch.equal(sd["module." + k], v), k  # the model itself is saved unchanged
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["first_conv_weight", "first_conv_bias", "normal_weight", "normal_bias",
                                           "BN scale/shift", "custom_ops", "lr5_weight", "lr10_bias"]
    assert all("lr_mult" in g and "decay_mult" in g for g in groups)
    assert all("momentum_buffer" in s for s in ckpt["optimizer"]["state"].values()) and ckpt["optimizer"]["state"]
    assert z.official_file_name("resnet50", 5, False) == "TSM_kinetics_RGB_resnet50_avg_segment5_e50.pth"


def test_mmaction2_checkpoint_plain_container(tmp_path):
    model = z.mmaction2_recognizer("resnet18", 10, 8, True)
    z.mmaction2_checkpoint(model, tmp_path / "epoch_50.pth")
    ckpt = torch.load(tmp_path / "epoch_50.pth", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    assert set(ckpt["meta"]) == {"epoch", "iter", "cfg", "seed", "experiment_name", "time", "mmengine_version",
                                 "dataset_meta"}
    assert "type='ResNetTSM'" in ckpt["meta"]["cfg"] and "shift_div=8" in ckpt["meta"]["cfg"]
    assert "num_segments=8" in ckpt["meta"]["cfg"]
    assert set(ckpt["message_hub"]) == {"log_scalars", "runtime_info", "resumed_keys"}
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert len(ckpt["param_schedulers"]) == 2 and "param_groups" in ckpt["optimizer"]


def test_mmaction2_checkpoint_with_objects_needs_unpickling(tmp_path):
    model = z.mmaction2_recognizer("resnet18", 10, 4, True)
    path = tmp_path / "epoch_50.pth"
    z.mmaction2_checkpoint(model, path, with_objects=True)
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|Counter|numpy"):
        torch.load(path, weights_only=True)
    with z.fake_mmengine():
        ckpt = torch.load(path, weights_only=False)
    hb = ckpt["message_hub"]["log_scalars"]["train/lr"]
    assert type(hb).__module__ == "mmengine.logging.history_buffer" and type(hb).__name__ == "HistoryBuffer"
    assert isinstance(ckpt["param_schedulers"][1]["milestones"], collections.Counter)
    import importlib.util
    import sys

    if importlib.util.find_spec("mmengine") is None:  # the stand-in modules are gone after the block
        assert "mmengine.logging.history_buffer" not in sys.modules


def test_mmaction2_published_container(tmp_path):
    model = z.mmaction2_recognizer("resnet18", 10, 8, False)
    z.mmaction2_published(model, tmp_path / "tsn.pth")
    ckpt = torch.load(tmp_path / "tsn.pth", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    assert not any(k.startswith("data_preprocessor.") for k in ckpt["state_dict"])
    assert "type='ResNet'" in ckpt["meta"]["cfg"] and "TSNHead" in ckpt["meta"]["cfg"]
    with_buffers = z.mmaction2_checkpoint(model, tmp_path / "old.pth", with_preprocessor_buffers=True)
    assert "data_preprocessor.mean" in with_buffers["state_dict"]


def test_timm_resnet50_keys_are_torchvision_keys():
    timm_sd, tv = z.timm_resnet50_state_dict(), torchvision.models.resnet50().state_dict()
    assert {k: v.shape for k, v in timm_sd.items()} == {k: v.shape for k, v in tv.items()}
    assert "layer1.0.downsample.0.weight" in timm_sd and "fc.weight" in timm_sd


def test_mmaction2_0x_container(tmp_path):
    model = z.mmaction2_recognizer("resnet18", 10, 8, True)
    z.mmaction2_checkpoint_0x(model, tmp_path / "pub.pth")
    ckpt = torch.load(tmp_path / "pub.pth", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"} and "cfg" not in ckpt["meta"] and "mmcv_version" in ckpt["meta"]
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    full = z.mmaction2_checkpoint_0x(model, tmp_path / "epoch_50.pth", published=False)
    assert set(full) == {"meta", "state_dict", "optimizer"}


def test_official_checkpoint_without_optimizer_and_mobilenetv2(tmp_path):
    model = z.official_tsn("mobilenetv2", 10, 8, True)
    z.official_checkpoint(model, tmp_path / "m.pth", with_optimizer=False)
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(ckpt) == {"epoch", "arch", "state_dict", "best_prec1"} and ckpt["arch"] == "mobilenetv2"
    assert "module.base_model.features.3.conv.0.net.weight" in ckpt["state_dict"]
    assert "module.new_fc.weight" in ckpt["state_dict"] and len(ckpt["state_dict"]) == 314
