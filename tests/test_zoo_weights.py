"""Model-zoo weights (issue 33): the TSM repository's and mmaction2's checkpoints, torchvision and
timm backbones, load into tsmtrain's networks and give the logits of the network they came from;
fine-tuning, refusals, and ``tsmtrain convert`` round trips.

The networks the files come from are built by ``tests/zoo_reference.py``, written after the other
projects' code without tsmtrain, and saved in their containers as those projects save them.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from tsmtrain.models import VideoNet
from tsmtrain.models.export import max_relative_difference
from tsmtrain.models.weights import WeightsError, load_weights, read_state
from tsmtrain.models.zoo import Recorded, settings_from_file_name, their_names

from .conftest import run_cli
from .zoo_reference import (mmaction2_checkpoint, mmaction2_checkpoint_0x, mmaction2_logits, mmaction2_published,
                            mmaction2_recognizer, official_checkpoint, official_file_name, official_logits,
                            official_tsn, randomize_, timm_resnet50_state_dict)

T, K = 4, 7
OURS = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenetv2": "mobilenet_v2"}


def clips(seed: int = 0, n: int = 2, size: int = 64) -> torch.Tensor:
    """Normalised clips ``(N, T, 3, S, S)``."""
    return torch.randn(n, T, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ours(arch, shift, num_classes=K, segments=T, **kw) -> VideoNet:
    return VideoNet(OURS[arch], num_classes, segments, shift=shift, **kw).eval()


# ---------------------------------------------------------------- each format gives its network's logits


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenetv2"])
@pytest.mark.parametrize("shift", [True, False])
def test_official_checkpoint_gives_the_official_logits(tmp_path, arch, shift):
    ref = official_tsn(arch, K, T, is_shift=shift, seed=3)
    path = tmp_path / official_file_name(arch, T, shift)
    official_checkpoint(ref, path, with_optimizer=arch == "resnet18")  # the optimizer (of plain values) too, once
    net = ours(arch, shift)
    report = load_weights(net, path)
    assert report.format == "tsm" and report.classifier == "loaded"
    assert report.loaded == len(net.state_dict())  # every tensor of the network came from the file
    assert report.recorded.num_segments == T and report.recorded.arch == OURS[arch]
    x = clips()
    with torch.no_grad():
        assert max_relative_difference(net(x), official_logits(ref, x)) < 1e-5


def test_official_checkpoint_trained_without_dropout_has_its_classifier_in_the_backbone(tmp_path):
    ref = official_tsn("resnet18", K, T, is_shift=True, dropout=0.0, seed=1)
    path = tmp_path / official_file_name("resnet18", T, True)
    official_checkpoint(ref, path, with_optimizer=False)
    assert any(k.startswith("module.base_model.fc.") for k in torch.load(path, weights_only=True)["state_dict"])
    net = ours("resnet18", True)
    load_weights(net, path)
    x = clips(1)
    with torch.no_grad():
        assert max_relative_difference(net(x), official_logits(ref, x)) < 1e-5


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenetv2"])
@pytest.mark.parametrize("shift", [True, False])
def test_mmaction2_published_checkpoint_gives_its_logits(tmp_path, arch, shift):
    ref = mmaction2_recognizer(arch, K, T, is_shift=shift, seed=5)
    path = tmp_path / "tsm_imagenet-pretrained-r50_8xb16-1x1x4-50e_kinetics400-rgb_20220831-64d69186.pth"
    mmaction2_published(ref, path)
    net = ours(arch, shift)
    report = load_weights(net, path)
    assert report.format == "mmaction2" and report.loaded == len(net.state_dict())
    assert report.recorded.num_segments == T
    x = clips(2)
    with torch.no_grad():
        assert max_relative_difference(net(x), mmaction2_logits(ref, x)) < 1e-5


@pytest.mark.parametrize("with_objects", [False, True])
def test_mmaction2_training_checkpoint_loads_without_running_its_objects(tmp_path, with_objects):
    """The runner's whole container (message_hub, optimizer, schedulers); with mmengine's objects
    (HistoryBuffer, Counter) they are read as inert shells, never as mmengine's classes."""
    ref = mmaction2_recognizer("resnet18", K, T, is_shift=True, seed=6)
    path = tmp_path / "epoch_50.pth"
    mmaction2_checkpoint(ref, path, with_objects=with_objects, with_preprocessor_buffers=True)
    net = ours("resnet18", True)
    report = load_weights(net, path)
    assert report.recorded.shift_div == 8 and report.recorded.sources["shift_div"] == "meta cfg"
    assert any("data_preprocessor.mean" in note for note in report.notes)
    x = clips(3)
    with torch.no_grad():
        assert max_relative_difference(net(x), mmaction2_logits(ref, x)) < 1e-5
    _fmt, container, _state = read_state(path)
    buffer = container["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer).__module__ != "mmengine.logging.history_buffer"  # not the class the file names


def test_mmaction2_0x_checkpoint_records_segments_in_its_name_only(tmp_path):
    ref = mmaction2_recognizer("resnet18", K, 8, is_shift=True, seed=7)
    path = tmp_path / "tsm_r18_1x1x8_50e_kinetics400_rgb_20200607-af7fb746.pth"  # (the zoo has r50)
    mmaction2_checkpoint_0x(ref, path)
    with pytest.raises(WeightsError, match=r"num_segments 8 there \(file name\), data\.num_segments = 4 here"):
        load_weights(ours("resnet18", True), path)


def test_torchvision_and_timm_backbones_load_their_tensors_and_leave_imagenets_classifier_out(tmp_path):
    tv = randomize_(torchvision.models.resnet18(weights=None), seed=2)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    net = VideoNet("resnet18", K, T, shift=True, pretrained=tmp_path / "r18.pth")
    report = net.weights_report
    assert report.format == "torchvision" and report.classifier == "left out"
    assert any("ImageNet's classifier (1000 classes)" in note for note in report.notes)
    assert torch.equal(net.backbone.layer1[0].conv1.net.weight, tv.layer1[0].conv1.weight)
    assert torch.equal(net.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)
    torch.save(timm_resnet50_state_dict(seed=4), tmp_path / "timm_r50.pth")
    net = VideoNet("resnet50", K, T, shift=False, pretrained=tmp_path / "timm_r50.pth")
    assert net.weights_report.loaded == len(net.state_dict()) - 2  # all but the classifier
    assert torch.equal(net.backbone.layer3[2].conv3.weight, timm_resnet50_state_dict(seed=4)["layer3.2.conv3.weight"])


# ---------------------------------------------------------------- fine-tuning and refusals


def test_fine_tuning_from_another_class_count_loads_the_backbone_and_starts_a_fresh_head(tmp_path, caplog):
    ref = official_tsn("resnet18", 400, T, is_shift=True, seed=8)
    path = tmp_path / official_file_name("resnet18", T, True)
    official_checkpoint(ref, path, with_optimizer=False)
    torch.manual_seed(0)
    fresh = ours("resnet18", True, num_classes=K)
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="tsmtrain"):
        net = VideoNet("resnet18", K, T, shift=True, pretrained=path).eval()
    notes = [n for n in net.weights_report.notes if "classifier left out" in n]
    assert len(notes) == 1 and "400 classes, model.num_classes = 7" in notes[0] and "fine-tuning" in notes[0]
    assert any("classifier left out" in r.message for r in caplog.records)
    assert torch.equal(net.fc.weight, fresh.fc.weight)  # the recipe's own initialisation
    assert torch.equal(net.backbone.layer2[1].conv1.net.weight, ref.base_model.layer2[1].conv1.net.weight)
    with pytest.raises(WeightsError, match="its classifier has 400 classes, model.num_classes = 7"):
        load_weights(ours("resnet18", True), path)  # testing needs the classifier


def _official(tmp_path, shift, name=None, **kw):
    ref = official_tsn("resnet18", K, T, is_shift=shift, seed=9, **kw)
    path = tmp_path / (name or official_file_name("resnet18", T, shift))
    official_checkpoint(ref, path, with_optimizer=False)
    return path


def test_refusals_name_the_difference(tmp_path):
    with pytest.raises(WeightsError, match=r"TSN \(no temporal shift\) weights, the recipe builds TSM"):
        load_weights(ours("resnet18", True), _official(tmp_path, False))
    with pytest.raises(WeightsError, match=r"TSM \(temporal shift\) weights, the recipe builds TSN"):
        load_weights(ours("resnet18", False), _official(tmp_path, True))
    path = _official(tmp_path, True, official_file_name("resnet18", T, True, shift_div=4))
    with pytest.raises(WeightsError, match=r"shift_div 4 there \(file name\), model.shift_div = 8 here"):
        load_weights(ours("resnet18", True), path)
    path = _official(tmp_path, True, official_file_name("resnet18", 8, True))
    with pytest.raises(WeightsError, match=r"num_segments 8 there \(file name\), data.num_segments = 4 here"):
        load_weights(ours("resnet18", True), path)
    with pytest.raises(WeightsError, match=r"arch resnet18 there \(arch entry\), model.arch = resnet50 here"):
        load_weights(ours("resnet50", True), _official(tmp_path, True))
    path = _official(tmp_path, True, official_file_name("resnet18", T, True, suffix="_dense_nl"))
    with pytest.raises(WeightsError, match="non-local blocks"):
        load_weights(ours("resnet18", True), path)
    path = _official(tmp_path, True, official_file_name("resnet18", T, True, suffix="_tpool"))
    with pytest.raises(WeightsError, match=r"temporal pooling \(tpool\)"):
        load_weights(ours("resnet18", True), path)
    path = _official(tmp_path, True, f"TSM_kinetics_RGB_resnet18_shift8_block_avg_segment{T}_e50.pth")
    with pytest.raises(WeightsError, match="shift place 'block'"):
        load_weights(ours("resnet18", True), path)
    # TSN weights do not depend on the segment count: a note, not a refusal (the official TSN
    # checkpoint was trained with 5 segments and tested with 8)
    path = _official(tmp_path, False, official_file_name("resnet18", 5, False))
    report = load_weights(ours("resnet18", False), path)
    assert any("trained with 5 segments" in note for note in report.notes)


def test_an_unmapped_or_misshaped_key_is_an_error_naming_it(tmp_path):
    ref = official_tsn("resnet18", K, T, is_shift=True, seed=10)
    state = torch.nn.DataParallel(ref).state_dict()
    state["module.base_model.layer1.0.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"1 key\(s\) fit no tensor .* base_model\.layer1\.0\.extra\.weight"):
        load_weights(ours("resnet18", True), tmp_path / "extra.pth")
    del state["module.base_model.layer1.0.extra.weight"]
    state["module.base_model.layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"base_model\.layer1\.0\.conv2\.weight is \(64, 64, 1, 1\) there"):
        load_weights(ours("resnet18", True), tmp_path / "shape.pth")


class _Payload:
    """Unpickling it would create a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["payload", "truncated", "tsn into tsm", "shift_div"])
def test_cli_refusals_are_one_line_exit_2(tmp_path, kind):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{root: {tmp_path}, train_list: t.txt, num_segments: {T}}}\n"
                      f"model: {{arch: resnet18, num_classes: {K}}}\n")
    marker = tmp_path / "MARKER"
    if kind == "payload":
        path = _official(tmp_path, True)
        state = torch.load(path, weights_only=True)
        state["extra"] = _Payload(marker)
        torch.save(state, path)
        why = "could run code"
    elif kind == "truncated":
        path = _official(tmp_path, True)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        why = str(path)
    elif kind == "tsn into tsm":
        path, why = _official(tmp_path, False), "TSN (no temporal shift) weights"
    else:
        path, why = _official(tmp_path, True, official_file_name("resnet18", T, True, shift_div=4)), "shift_div 4"
    for args in (["convert", path, "--recipe", recipe, "--out", tmp_path / "out.pth"],
                 ["export", recipe, "--weights", path, "--format", "torchscript", "--out", tmp_path / "out.pt"]):
        proc = run_cli(*map(str, args), cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert why in errors[0] and str(path) in errors[0]
    assert not marker.exists() and not (tmp_path / "out.pth").exists() and not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- convert


def _recipe(tmp_path, arch="resnet18", shift=True):
    path = tmp_path / f"{arch}-{shift}.yaml"
    path.write_text(f"data: {{root: {tmp_path}, train_list: t.txt, num_segments: {T}}}\n"
                    f"model: {{arch: {arch}, num_classes: {K}, shift: {str(shift).lower()}}}\n")
    return path


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_convert_round_trips_are_exact(tmp_path, arch):
    torch.manual_seed(11)
    net = randomize_(VideoNet(arch, K, T), seed=11).eval()
    torch.save({"model": net.state_dict(), "recipe": {}}, tmp_path / "start.pth")
    recipe = _recipe(tmp_path, arch)
    hops = [("tsm", "TSM_kinetics_RGB_x.pth"), ("tsmtrain", "back.pth"), ("mmaction2", "mm.pth"), ("tsmtrain", "end.pth")]
    src = tmp_path / "start.pth"
    for fmt, name in hops:
        proc = run_cli("convert", str(src), "--recipe", str(recipe), "--out", str(tmp_path / name), "--to", fmt)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"wrote {tmp_path / name} ({fmt} format" in proc.stdout
        src = tmp_path / name
    end = torch.load(tmp_path / "end.pth", weights_only=True)["model"]
    assert end.keys() == net.state_dict().keys()
    assert all(torch.equal(end[k], v) for k, v in net.state_dict().items())
    theirs = torch.load(tmp_path / "TSM_kinetics_RGB_x.pth", weights_only=True)
    assert set(theirs) == {"epoch", "arch", "state_dict", "best_prec1"}
    assert all(k.startswith(("module.base_model.", "module.new_fc.")) for k in theirs["state_dict"])


def test_converted_official_file_is_what_the_official_network_loads(tmp_path):
    """tsmtrain -> tsm, loaded into the reference official network (as its test_models.py does:
    the first name component dropped), gives tsmtrain's logits."""
    torch.manual_seed(12)
    net = randomize_(VideoNet("resnet18", K, T), seed=12).eval()
    torch.save({"model": net.state_dict(), "recipe": {}}, tmp_path / "ours.pth")
    out = tmp_path / official_file_name("resnet18", T, True)
    proc = run_cli("convert", str(tmp_path / "ours.pth"), "--recipe", str(_recipe(tmp_path)), "--out", str(out), "--to", "tsm")
    assert proc.returncode == 0, proc.stderr
    ref = official_tsn("resnet18", K, T, is_shift=True, seed=0)
    ref.load_state_dict({".".join(k.split(".")[1:]): v for k, v in torch.load(out, weights_only=True)["state_dict"].items()})
    x = clips(4)
    with torch.no_grad():
        assert max_relative_difference(official_logits(ref, x), net(x)) < 1e-5
    mm = tmp_path / "mm.pth"
    assert run_cli("convert", str(tmp_path / "ours.pth"), "--recipe", str(_recipe(tmp_path)), "--out", str(mm),
                   "--to", "mmaction2").returncode == 0
    ref = mmaction2_recognizer("resnet18", K, T, is_shift=True, seed=0)
    ref.load_state_dict(torch.load(mm, weights_only=True)["state_dict"])
    with torch.no_grad():
        assert max_relative_difference(mmaction2_logits(ref, x), net(x)) < 1e-5


def test_file_names_of_the_tsm_zoo_are_read_as_its_test_script_reads_them():
    r = Recorded("tsm")
    settings_from_file_name("TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e100_dense.pth", r)
    assert (r.arch, r.shift_div, r.num_segments, r.modality) == ("resnet50", 8, 8, "RGB")
    r = Recorded("tsm")
    settings_from_file_name("TSM_kinetics_Flow_mobilenetv2_shift4_blockres_avg_segment16_e50.pth", r)
    assert (r.arch, r.shift_div, r.num_segments, r.modality) == ("mobilenet_v2", 4, 16, "Flow")
    r = Recorded("tsm")
    settings_from_file_name("my_weights.pth", r)
    assert r.sources == {}
    names = their_names("tsm", list(VideoNet("mobilenet_v2", K, T).state_dict()), "mobilenet_v2")
    assert names["backbone.features.3.conv.0.net.0.weight"] == "base_model.features.3.conv.0.net.weight"
    assert names["backbone.features.3.conv.0.net.1.running_var"] == "base_model.features.3.conv.1.running_var"
    assert names["backbone.features.1.conv.2.bias"] == "base_model.features.1.conv.4.bias"


# ---------------------------------------------------------------- test and predict any weights file


@pytest.mark.slow
def test_test_and_predict_score_a_model_zoo_file_as_the_same_weights_in_tsmtrain_format(tmp_path, tiny_demo):
    """``tsmtrain test --weights`` and ``predict --weights`` on an official checkpoint, with no run
    directory: the same per-video scores as the weights converted to tsmtrain's format."""
    import numpy as np

    from .conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "zoo", dist={"engine": "none"}, data={"workers": 0})
    ref = official_tsn("resnet18", 4, 4, is_shift=True, seed=13)
    official = tmp_path / official_file_name("resnet18", 4, True)
    official_checkpoint(ref, official, with_optimizer=False)
    mine = tmp_path / "mine.pth"
    assert run_cli("convert", str(official), "--recipe", str(recipe), "--out", str(mine)).returncode == 0
    scores = []
    for weights in (official, mine):
        proc = run_cli("test", str(recipe), "--weights", str(weights), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"weights {weights}: " in proc.stderr and "top-1" in proc.stdout
        folder = tmp_path / "runs" / "zoo" / "test" / "test-1clip-1crop"
        scores.append(dict(np.load(next(folder.glob("*.npz")))))
        (folder / "summary.json").unlink()
    first, second = scores
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    video = tiny_demo / (tiny_demo / "val.txt").read_text().split()[0]
    out = [run_cli("predict", str(recipe), str(video), "--weights", str(w), cwd=tmp_path) for w in (official, mine)]
    assert all(p.returncode == 0 for p in out), out[0].stderr[-2000:]
    assert out[0].stdout.splitlines()[1:] == out[1].stdout.splitlines()[1:] and len(out[0].stdout.splitlines()) == 6
