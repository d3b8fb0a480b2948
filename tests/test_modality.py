"""Motion inputs (tsmtrain.data.modality): snippet sampling, flow read from the files prepare and
data.generate store, RGB difference, the flip of flow, cross-modality initialisation, and training,
testing and predicting with each modality."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_video, tiny_recipe
from tsmtrain.cli import app
from tsmtrain.data import VideoRecord, read_list
from tsmtrain.data import flow as F
from tsmtrain.prep import flow_files as FF
from tsmtrain.data.decoding import open_video
from tsmtrain.data.loader import DataError, FlowFrames, VideoClipDataset, clip_dataset, flow_files
from tsmtrain.data.readers.files import prepared_videos
from tsmtrain.data.modality import FLOW_MEAN, Modality, modality_of
from tsmtrain.data.sampling import multi_clip_indices, multi_snippet_indices, segment_indices, snippet_indices
from tsmtrain.data.modality import IMAGENET_STD
from tsmtrain.data.transforms import TestViews, VideoTransform
from tsmtrain.models import VideoNet, count_macs
from tsmtrain.recipe import RecipeError, load_recipe

cv2 = pytest.importorskip("cv2")
pytest.importorskip("torchcodec")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- sampling


def test_snippets_of_one_frame_are_the_segment_frames():
    for frames in (1, 5, 16, 301):
        a = snippet_indices(frames, 8, 1, True, np.random.default_rng(3))
        b = segment_indices(frames, 8, True, np.random.default_rng(3))
        assert a.shape == (8, 1) and np.array_equal(a[:, 0], b)
        assert np.array_equal(snippet_indices(frames, 8, 1, False)[:, 0], segment_indices(frames, 8, False))
        assert np.array_equal(multi_snippet_indices(frames, 8, 3, 1)[..., 0], multi_clip_indices(frames, 8, 3))


def test_snippets_are_consecutive_and_inside_the_video():
    rng = np.random.default_rng(0)
    for frames in (15, 40, 300):
        for train in (True, False):
            idx = snippet_indices(frames, 8, 5, train, rng)
            assert idx.shape == (8, 5) and idx.min() >= 0 and idx.max() < frames
            assert (np.diff(idx, axis=1) == 1).all()  # L consecutive fields
            assert (np.diff(idx[:, 0]) >= 0).all()
    assert snippet_indices(3, 2, 5, False).max() == 2  # shorter than a snippet: the last frame repeats
    many = multi_snippet_indices(300, 8, 2, 6)
    assert many.shape == (2, 8, 6) and (np.diff(many, axis=2) == 1).all() and many.max() < 300


# --------------------------------------------------------------------------- modality and transforms


def test_modality_channels_and_recipe_checks(tmp_path):
    assert (Modality("flow", 5).in_channels, Modality("rgb_diff", 5).in_channels, Modality().in_channels) == (10, 15, 3)
    assert Modality("flow", 5).frames_per_segment == 5 and Modality("rgb_diff", 5).frames_per_segment == 6
    assert Modality("rgb", 7).length == 1 and Modality("flow").mean == FLOW_MEAN
    with pytest.raises(ValueError, match="flow needs 2 mean"):
        Modality("flow", 5, mean=(0.5, 0.5, 0.5))
    import yaml

    def recipe(**data):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"data": {"train_list": "l.txt", **data}, "model": {"num_classes": 4}}))
        return load_recipe(path, check_files=False)

    assert modality_of(recipe().data) == Modality()
    assert modality_of(recipe(modality="rgb_diff", flow_length=3).data) == Modality("rgb_diff", 3)
    with pytest.raises(RecipeError) as err:
        recipe(modality="flow", mean=[0.5, 0.5, 0.5], decode_device="cuda", decoder="pynvvideocodec")
    keys = {p.key for p in err.value.problems}
    assert {"data.mean", "data.decode_device"} <= keys


def _flow_clip(seed=0, n=3, t=4, size=16) -> torch.Tensor:
    return torch.randint(0, 256, (n, t, size, size, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pixels(out: torch.Tensor, bound=20.0) -> torch.Tensor:
    """Normalised flow back to pixels: (x * 128 + 128) is the quantized value."""
    return (out * 128 + 128) * (2 * bound / 255) - bound


def test_a_flip_of_flow_mirrors_it_and_negates_x():
    m = Modality("flow", 2)
    clips = _flow_clip()
    plain = _pixels(VideoTransform(False, 16, modality=m)(clips))  # (N, T/2, 4, S, S): eval resizes 16 -> 18
    flips = VideoTransform(True, 16, scales=(1.0,), flip=True, modality=m, generator=torch.Generator().manual_seed(1))
    unflipped = VideoTransform(True, 16, scales=(1.0,), flip=False, modality=m)
    ref = _pixels(unflipped(clips))
    seen = set()
    for seed in range(6):
        flips.generator.manual_seed(seed)
        out = _pixels(flips(clips))
        for i in range(len(clips)):
            if torch.allclose(out[i], ref[i], atol=1e-4):
                seen.add("kept")
                continue
            mirrored = ref[i].flip(-1)
            assert torch.allclose(out[i][:, 0::2], -mirrored[:, 0::2], atol=1e-4)  # x negated
            assert torch.allclose(out[i][:, 1::2], mirrored[:, 1::2], atol=1e-4)  # y kept
            seen.add("flipped")
    assert seen == {"kept", "flipped"} and plain.shape == (3, 2, 4, 16, 16)
    # the test protocol's flipped views too
    views = _pixels(TestViews(16, 10, modality=m)(clips[:, None]))  # (N, 10, T, 4, 16, 16)
    assert views.shape == (3, 10, 2, 4, 16, 16)
    assert torch.allclose(views[:, 1, :, 0::2], -views[:, 0, :, 0::2].flip(-1), atol=1e-4)
    assert torch.allclose(views[:, 1, :, 1::2], views[:, 0, :, 1::2].flip(-1), atol=1e-4)


def test_dequantized_inverse_is_negated_flow():
    q = np.arange(256, dtype=np.uint8)
    assert np.allclose(F.dequantize_flow(255 - q), -F.dequantize_flow(q), atol=1e-5)


# --------------------------------------------------------------------------- rgb_diff


def test_rgb_diff_is_the_difference_of_decoded_frames(tiny_demo):
    record = read_list(tiny_demo / "val.txt", tiny_demo, 4)[0]
    m = Modality("rgb_diff", 2)
    # decoded at short side 36 = eval_resize_size(32): the evaluation transform only crops
    ds = VideoClipDataset([record], 3, train=False, short_side=36, modality=m)
    item = ds[0]
    video = open_video(record.path, size=(36, 36))
    idx = snippet_indices(video.num_frames, 3, 3, False)
    decoded = video.frames(idx.reshape(-1).tolist())
    assert item["frames"].shape == (9, 36, 36, 3) and torch.equal(item["frames"], decoded)
    out = VideoTransform(False, 32, modality=m)(item["frames"][None])
    assert out.shape == (1, 3, 6, 32, 32)
    frames = decoded[:, 2:34, 2:34].permute(0, 3, 1, 2).double().view(3, 3, 3, 32, 32)  # (T, L+1, 3, H, W)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 1, 3, 1, 1) * 255
    expect = ((frames[:, 1:] - frames[:, :-1]) / std).reshape(3, 6, 32, 32)
    assert torch.allclose(out[0].double(), expect, atol=1e-4)
    assert out.abs().max() > 0.1  # the shapes move: the differences are not all zero


# --------------------------------------------------------------------------- cross-modality initialisation


def test_cross_modality_initialisation_averages_the_rgb_kernel(tmp_path):
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "r18.pth")
    net = VideoNet("resnet18", 4, 8, shift=False, pretrained=tmp_path / "r18.pth", in_channels=10)
    w = net.backbone.conv1.weight
    assert w.shape == (64, 10, 7, 7)
    mean = rgb.conv1.weight.mean(dim=1)
    for c in range(10):
        assert torch.allclose(w[:, c], mean, atol=1e-7)
    assert torch.equal(net.backbone.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)  # the rest as loaded
    mobile = torchvision.models.mobilenet_v2(weights=None)
    torch.save(mobile.state_dict(), tmp_path / "mv2.pth")
    net = VideoNet("mobilenet_v2", 4, 8, pretrained=tmp_path / "mv2.pth", in_channels=6)
    assert torch.allclose(net.backbone.features[0][0].weight, mobile.features[0][0].weight.mean(1, keepdim=True)
                          .expand(-1, 6, -1, -1))
    fresh = VideoNet("resnet18", 4, 8, in_channels=10).backbone.conv1.weight
    assert fresh.shape == (64, 10, 7, 7) and not torch.allclose(fresh[:, 0], fresh[:, 1])
    x = torch.zeros(1, 8, 10, 32, 32)
    assert VideoNet("resnet18", 4, 8, in_channels=10)(x).shape == (1, 4)
    with pytest.raises(ValueError, match="8 segments of 10 channels"):
        VideoNet("resnet18", 4, 8, in_channels=10)(torch.zeros(1, 8, 3, 32, 32))
    assert count_macs(VideoNet("resnet18", 4, 8, in_channels=10), 32) > count_macs(VideoNet("resnet18", 4, 8), 32)


# --------------------------------------------------------------------------- where flow comes from


@pytest.fixture(scope="module")
def prepared_flow(tmp_path_factory):
    """Three small videos prepared with --flow dis (the folder of manifest, outputs and flow)."""
    from tests.test_prepare import _run

    src = tmp_path_factory.mktemp("flow_src")
    for i in range(3):
        make_video(src / f"v{i}.mp4", frames=10 + 2 * i, size=40)
    (src / "train.txt").write_text("v0.mp4 0\nv1.mp4 1\nv2.mp4 0\n")
    out = tmp_path_factory.mktemp("flow_out")
    _run("prepare", "--list", src / "train.txt", "--root", src, "--out", out, "--flow", "dis", "--short-side", "40",
         "--jobs", 1)
    return out


def test_the_loader_reads_the_flow_prepare_stored(prepared_flow, tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", prepared_flow, "f", data={
        "train_list": str(prepared_flow / "train.txt"), "val_list": None, "modality": "flow", "flow_length": 3,
        "short_side": 40, "input_size": 32, "num_segments": 2}))
    records = read_list(prepared_flow / "train.txt", prepared_flow, 4)
    ds = clip_dataset(recipe, records, train=True)
    for i, r in enumerate(records):
        entry = prepared_videos(prepared_flow)[r.path]
        assert ds.flows[r.path] == str(prepared_flow / entry["flow"])
        item = ds[(i, 0)]
        idx = snippet_indices(entry["flow_frames"], 2, 3, True, np.random.default_rng((recipe.train.seed, 0, i)))
        expect = F.read_flow(ds.flows[r.path], idx.reshape(-1).tolist())
        assert item["frames"].shape == (6, 40, 40, 2) and np.array_equal(item["frames"].numpy(), expect)
    # other settings than the recipe's are refused, naming the video
    with pytest.raises(DataError, match=r"computed with --flow dis .* data.flow_method: farneback"):
        flow_files(prepared_flow, records, prepared_videos(prepared_flow), "farneback", "medium", 20.0)


def test_flipped_bytes_in_a_flow_file_are_a_damaged_sample(prepared_flow, tmp_path, caplog):
    """issue 30, item 6: flipping 20 bytes in an FFV1 flow file silently changed frames; the
    manifest's CRC-32 of each flow file now finds it where it is read, and the video is replaced
    and counted as a damaged shard sample is. A manifest without checksums still reads (a warning)."""
    import shutil

    from tsmtrain.data.manifest import MANIFEST

    copy = tmp_path / "copy"
    shutil.copytree(prepared_flow, copy)
    records = read_list(copy / "train.txt", copy, 4)
    prepared = prepared_videos(copy)
    entry = prepared[records[1].path]
    assert entry["flow_crc32"] == F.file_crc32(entry["flow"])
    original, n = Path(entry["flow"]).read_bytes(), entry["flow_frames"]
    reference = F.read_flow(entry["flow"], range(n))
    for at in range(len(original) // 2, len(original) - 20, 67):  # 20 bytes flipped where FFV1 does not notice
        data = bytearray(original)
        data[at:at + 20] = bytes(b ^ 0xFF for b in data[at:at + 20])
        Path(entry["flow"]).write_bytes(bytes(data))
        try:
            if not np.array_equal(F.read_flow(entry["flow"], range(n)), reference):
                break  # decodes without an error, to other flow: what the issue found
        except F.FlowError:
            pass
    else:
        pytest.fail("no 20 flipped bytes changed the flow silently")
    modality = Modality("flow", 3)
    flows = flow_files(copy, records, prepared, "dis", "medium", 20.0)
    ds = VideoClipDataset(records, 2, train=True, prepared=prepared, modality=modality, flows=flows, short_side=40)
    item = ds[(1, 0)]
    assert item["index"] != 1 and len(item["failed"]) == 1
    assert "CRC-32 mismatch" in item["failed"][0] and entry["flow"] in item["failed"][0]
    assert ds[(0, 0)]["failed"] == []  # the others read as before
    # a manifest written before the checksums: read unchecked, with one warning
    lines = (copy / MANIFEST).read_text().splitlines()
    (copy / MANIFEST).write_text("".join(json.dumps({k: v for k, v in json.loads(line).items()
                                                     if k != "flow_crc32"}) + "\n" for line in lines))
    old = prepared_videos(copy)
    with caplog.at_level("WARNING"):
        flows = flow_files(copy, records, old, "dis", "medium", 20.0)
    assert "3 of 3 videos' flow files have no checksum in the manifest" in caplog.text
    ds = VideoClipDataset(records, 2, train=True, prepared=old, modality=modality, flows=flows, short_side=40)
    assert ds[(0, 0)]["failed"] == []

def test_videos_without_flow_are_one_error_line(tiny_demo, tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "noflow", data={"modality": "flow"}, dist={"engine": "none"})
    done = invoke("run", path)
    lines = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert done.exit_code == 2 and len(lines) == 1, done.output
    assert "have no optical flow, first" in lines[0] and "videos/train/0_0000.mp4" in lines[0]
    assert "tsmtrain prepare --flow dis" in lines[0] and "Traceback" not in done.output


def test_flow_of_a_rendered_dataset_is_made_once(tmp_path, monkeypatch):
    from tsmtrain.prep import synthetic
    from tsmtrain.prep.datasets import prepare_dataset

    monkeypatch.setattr(synthetic, "generate_demo_dataset",
                        functools.partial(synthetic.generate_demo_dataset, train_per_class=2, val_per_class=1,
                                          frames=8, size=32))
    root = tmp_path / "demo"
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", root, "g", data={"generate": "demo", "modality": "flow"}),
                         check_files=False)
    prepare_dataset(recipe)
    marker = json.loads((root / F.FLOW_MARKER).read_text())
    assert marker == {"method": "dis", "preset": "medium", "bound": 20.0, "videos": 12}
    videos = sorted(root.rglob("*.mp4"))
    assert len(videos) == 12 and all(Path(F.flow_path(str(v))).is_file() for v in videos)
    q = F.read_flow(F.flow_path(str(videos[0])), range(7))
    expect = F.quantize_flow(F.compute_flow(open_video(videos[0]).get(range(8))))
    assert q.shape == (7, 32, 32, 2) and np.abs(q.astype(int) - expect).max() <= 1
    stamp = Path(F.flow_path(str(videos[0]))).stat().st_mtime_ns
    assert FF.flow_of_dataset(root, [str(v) for v in videos]) == 0  # all there: nothing again
    assert Path(F.flow_path(str(videos[0]))).stat().st_mtime_ns == stamp
    records = read_list(recipe.data.train_list, root, 4)
    ds = clip_dataset(recipe, records, train=False)
    assert ds[0]["frames"].shape == (4 * 5, 32, 32, 2)  # 4 segments of 5 fields


def test_predict_computes_the_flow_of_a_video_never_prepared(tmp_path):
    video = make_video(tmp_path / "clip.mp4", frames=12, size=32)
    frames = FlowFrames.computed(open_video(video), "dis", "medium", 20.0)
    assert frames.num_frames == 11
    expect = F.quantize_flow(F.compute_flow(open_video(video).get(range(12))))
    assert np.array_equal(frames.frames([0, 10]).numpy(), expect[[0, 10]])
    one = make_video(tmp_path / "one.mp4", frames=1, size=32)
    ds = VideoClipDataset([VideoRecord(str(one), 0)], 2, train=False, modality=Modality("flow", 2),
                          flow_settings={"method": "dis", "preset": "medium", "bound": 20.0})
    with pytest.raises(DataError, match="one frame: no optical flow"):
        ds[0]


# --------------------------------------------------------------------------- every modality end to end


@pytest.mark.parametrize("modality,shift", [("flow", False), ("rgb_diff", True)])
def test_train_test_and_predict_with_a_motion_modality(tmp_path, modality, shift, monkeypatch):
    from tsmtrain.prep import synthetic

    root = tmp_path / "demo"
    synthetic.generate_demo_dataset(root, num_classes=4, train_per_class=2, val_per_class=1, frames=8, size=32)
    if modality == "flow":
        videos = [r.path for name in ("train.txt", "val.txt") for r in read_list(root / name, root, 4)]
        FF.flow_of_dataset(root, videos)
    path = tiny_recipe(tmp_path / "r.yaml", root, modality, dist={"engine": "none"}, model={"shift": shift},
                       data={"modality": modality, "flow_length": 2, "workers": 0},
                       schedule={"epochs": 1, "warmup_epochs": 0})
    done = invoke("run", path)
    assert done.exit_code == 0, done.output
    recipe = load_recipe(path)
    metrics = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in m for m in metrics) and all(np.isfinite(m.get("loss", 0)) for m in metrics)
    state = torch.load(sorted(recipe.run_dir.glob("checkpoint*"))[-1], map_location="cpu", weights_only=True)
    conv = next(v for k, v in state["model"].items() if k.endswith("conv1.weight"))
    assert conv.shape[1] == Modality(modality, 2).in_channels
    done = invoke("test", path, "--clips", 2, "--crops", 3)
    assert done.exit_code == 0, done.output
    tests = sorted((recipe.run_dir / "test").iterdir())
    with np.load(tests[-1] / "scores.npz") as npz:
        assert npz["scores"].shape == (4, 4) and np.allclose(npz["scores"].sum(1), 1, atol=1e-5)
    video = read_list(root / "val.txt", root, 4)[0].path
    done = invoke("predict", path, video)
    assert done.exit_code == 0 and "unreadable" not in done.output, done.output
    lines = done.output.splitlines()
    scores = [float(line.split()[0]) for line in lines[lines.index(f"{video}:") + 1:]]
    assert len(scores) == 4 and sum(scores) == pytest.approx(1, abs=1e-3)


def test_demo_pairs_counts_within_pair_accuracy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_pairs", Path(__file__).parents[1] / "scripts" / "demo_pairs.py")
    demo_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_pairs)
    scores = np.eye(4)[[0, 1, 1, 0, 2, 3, 3, 1]]  # videos 2, 3 swapped within pair 0; 7 in the other pair
    labels = np.array([0, 1, 0, 1, 2, 3, 3, 3])
    c = demo_pairs.confusion(scores, labels, 4)
    assert c.sum() == 8 and c[0, 1] == 1 and c[1, 0] == 1 and c[3, 1] == 1
    top1, pair, within = demo_pairs.pair_figures(c)
    assert (top1, pair, within) == pytest.approx((100 * 5 / 8, 100 * 7 / 8, 100 * 5 / 7))
