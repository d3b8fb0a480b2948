"""GPU decoding on the CPU: the backend's selection, its refusal without a GPU and the fallback
message; PyNvVideoCodec's frame handling through a stand-in module; the encoded-bytes loader path
(workers read, the training process decodes) giving the same batches as the CPU loader; and the
decode-ahead overlap with a fake decoder that records the order of calls. The frames of the real
NVDEC decoder against the CPU's are measured by scripts/gpu_check.sh on a GPU machine."""

import sys
import threading
import types

import numpy as np
import pytest
import torch

from tests.conftest import make_video
from tsmtrain.data import DataError, RankSampler, VideoClipDataset, VideoRecord, build_loader
from tsmtrain.data import decoding
from tsmtrain.data.decode_ahead import DecodeAhead
from tsmtrain.data.loader import decoding_target

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers of a machine without CUDA")


@pytest.fixture(autouse=True)
def fresh_probes():
    decoding.probe_gpu_decoding.cache_clear()
    decoding_target.cache_clear()
    yield
    decoding.probe_gpu_decoding.cache_clear()
    decoding_target.cache_clear()


def test_cpu_decoding_is_chosen_as_asked():
    assert decoding_target("torchcodec", "cpu", torch.device("cpu")) == ("torchcodec", "cpu")
    assert decoding_target("decord", "cpu", torch.device("cuda", 1)) == ("decord", "cpu")


def test_pynvvideocodec_is_refused_on_a_rank_without_a_gpu():
    with pytest.raises(DataError, match=r"data.decoder: pynvvideocodec decodes on an NVIDIA GPU.*trains on cpu.*"
                                        r"data.decoder: torchcodec"):
        decoding_target("pynvvideocodec", "cuda", torch.device("cpu"))


def test_torchcodec_on_a_cpu_rank_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="decode_device: cuda: this rank trains on cpu.*decoding with torchcodec on "
                                         "the CPU instead"):
        assert decoding_target("torchcodec", "cuda", torch.device("cpu")) == ("torchcodec", "cpu")


@no_cuda
def test_a_gpu_the_probe_cannot_use_falls_back_to_torchcodec_on_the_cpu():
    with pytest.warns(UserWarning, match="data.decoder: pynvvideocodec with data.decode_device: cuda: no CUDA device; "
                                         "decoding with torchcodec on the CPU instead"):
        assert decoding_target("pynvvideocodec", "cuda", torch.device("cuda", 0)) == ("torchcodec", "cpu")
    assert decoding.gpu_decoders() == {backend: "no CUDA device" for backend in decoding.GPU_BACKENDS}


@no_cuda
def test_the_probe_names_what_is_missing_when_cuda_is_there(monkeypatch):
    """With a CUDA device but without a usable PyNvVideoCodec (absent, or no driver: its import
    raises RuntimeError), the probe's answer is one line that names the package."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # import fails
    reason = decoding.probe_gpu_decoding("pynvvideocodec", "cuda:0")
    assert reason is not None and "'pynvvideocodec' package" in reason and "could not be imported" in reason
    assert "\n" not in reason
    with pytest.raises(ValueError, match="does not decode on a GPU"):
        decoding.probe_gpu_decoding("decord", "cuda:0")


def test_the_schema_pairs_decoders_with_devices(tmp_path):
    from tsmtrain.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe("configs/demo.yaml", ["data.decoder=pynvvideocodec"], check_files=False)
    assert any("data.decoder" in str(p) and "data.decode_device: cuda" in str(p) for p in err.value.problems)
    with pytest.raises(RecipeError) as err:
        load_recipe("configs/demo.yaml", ["data.decoder=decord", "data.decode_device=cuda"], check_files=False)
    assert any("decord decodes on the CPU only" in str(p) for p in err.value.problems)
    ok = load_recipe("configs/demo.yaml", ["data.decoder=pynvvideocodec", "data.decode_device=cuda"],
                     check_files=False)
    assert ok.data.decoder == "pynvvideocodec"


class _FakeNvc(types.ModuleType):
    """A stand-in for PyNvVideoCodec with its documented SimpleDecoder API, decoding on the CPU
    with torchcodec; records every call of get_batch_frames_by_index."""

    class OutputColorType:
        NATIVE, RGB, RGBP = 0, 1, 2

    def __init__(self):
        super().__init__("PyNvVideoCodec")
        self.calls, self.opened = [], []
        fake = self

        class SimpleDecoder:
            def __init__(self, source, gpu_id=0, cuda_context=0, cuda_stream=0, use_device_memory=True,
                         output_color_type=0, **_):
                from torchcodec.decoders import VideoDecoder

                fake.opened.append(dict(gpu_id=gpu_id, cuda_stream=cuda_stream, bytes=isinstance(source, bytes),
                                        color=output_color_type, device_memory=use_device_memory))
                self._d = VideoDecoder(source, dimension_order="NHWC", seek_mode="exact")

            def __len__(self):
                return self._d.metadata.num_frames

            def get_batch_frames_by_index(self, indices):  # as the real one: drops repeats
                fake.calls.append(list(indices))
                seen = list(dict.fromkeys(indices))
                return [frame for frame in self._d.get_frames_at(seen).data]

        self.SimpleDecoder = SimpleDecoder


@pytest.fixture
def fake_nvc(monkeypatch):
    pytest.importorskip("torchcodec")
    fake = _FakeNvc()
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", fake)
    monkeypatch.setattr(decoding, "GPU_ONLY", ())  # let the stand-in run on the CPU
    return fake


def test_pynvvideocodec_frames_follow_the_requested_order(tmp_path, fake_nvc):
    """Unsorted, repeating indices: each distinct frame decoded once, in increasing order, and the
    frames handed back in the order asked, equal to torchcodec's; RGB asked of the decoder."""
    path = make_video(tmp_path / "v.mp4", frames=20, size=32)
    want = decoding.open_video(path, "torchcodec", seek_mode="exact").frames([7, 2, 7, 15, 0])
    video = decoding.open_video(path, "pynvvideocodec", device="cpu", data=path.read_bytes())
    assert video.num_frames == 20 and video.seek_mode == "exact"
    got = video.frames([7, 2, 7, 15, 0])
    assert fake_nvc.calls == [[0, 2, 7, 15]]
    assert fake_nvc.opened[-1]["bytes"] and fake_nvc.opened[-1]["color"] == _FakeNvc.OutputColorType.RGB
    assert fake_nvc.opened[-1]["device_memory"] is True
    assert torch.equal(got, want)
    with pytest.raises(decoding.VideoDecodeError, match="out of range"):
        video.frames([20])


def test_pynvvideocodec_is_resized_after_decoding(tmp_path, fake_nvc):
    path = make_video(tmp_path / "v.mp4", frames=10, size=32)
    video = decoding.open_video(path, "pynvvideocodec", device="cpu", size=(16, 24))
    frames = video.frames([1, 3])
    assert frames.shape == (2, 16, 24, 3) and frames.dtype == torch.uint8


def test_resize_frames_keeps_the_channels_in_place():
    """Three channels of different levels stay where they are (an (H, W, 3) layout mistaken for
    (3, H, W) would mix them); the same size is no resize at all."""
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 30, (2, 40, 60, 3), dtype=np.uint8)) + torch.tensor([10, 100, 200],
                                                                                               dtype=torch.uint8)
    out = decoding.resize_frames(frames, (20, 30))
    assert out.shape == (2, 20, 30, 3) and out.dtype == torch.uint8
    np.testing.assert_allclose(out.float().mean((0, 1, 2)), frames.float().mean((0, 1, 2)), atol=1.0)
    assert decoding.resize_frames(frames, (40, 60)) is frames
    with pytest.raises(ValueError):
        decoding.resize_frames(frames, (0, 3))


def test_pynvvideocodec_refuses_the_cpu():
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        decoding.open_video(decoding.PROBE_CLIP, "pynvvideocodec", device="cpu")


def _videos(tmp_path, count=6):
    records = [VideoRecord(str(make_video(tmp_path / f"v{i}.mp4", frames=12 + i, size=32)), i % 3) for i in range(count)]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(1).bytes(2048))
    return records + [VideoRecord(str(corrupt), 0), VideoRecord(str(tmp_path / "missing.mp4"), 1)]


def _epochs(dataset, workers, epochs=2, batch=2):
    sampler = RankSampler(len(dataset), 0, 1, shuffle=True, pad=True, seed=3)
    loader = build_loader(dataset, sampler, batch, workers, drop_last=True, persistent=True)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(loader)
    return loader, out


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_path_gives_the_cpu_loaders_batches(tmp_path, monkeypatch, workers):
    """The encoded path (workers read bytes, DecodeAhead decodes in this process) gives the CPU
    loader's batches bit for bit over two epochs, unreadable videos replaced the same way."""
    pytest.importorskip("torchcodec")
    records = _videos(tmp_path)
    make = lambda: VideoClipDataset(records, 4, train=True, seed=5, short_side=24)  # noqa: E731
    _, want = _epochs(make(), workers)
    monkeypatch.setattr(VideoClipDataset, "decodes_on_gpu", property(lambda self: True))
    fetched = make()
    raw = fetched[(0, 0)]
    assert set(raw) >= {"encoded", "label", "index", "epoch", "failed"} and "frames" not in raw
    assert raw["encoded"][0] == open(records[0].path, "rb").read()
    loader, got = _epochs(make(), workers)
    assert isinstance(loader, DecodeAhead) and len(loader) == len(want) // 2
    assert len(got) == len(want) and sum(len(b["failed"]) for b in want) > 0
    for a, b in zip(want, got):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["label"], b["label"])
        assert a["failed"] == b["failed"]


def test_a_video_only_the_gpu_cannot_decode_is_replaced(tmp_path, monkeypatch):
    """Bytes that a worker reads but the decoder refuses are replaced in the training process,
    counted in ``failed``, with the CPU loader's deterministic replacement."""
    pytest.importorskip("torchcodec")
    records = _videos(tmp_path, count=3)[:3]
    dataset = VideoClipDataset(records, 4, train=True, seed=5)
    item = dataset.decode_item({"encoded": (b"not a video", None), "index": 1, "epoch": 0, "failed": [],
                                "opened": ["x"], "label": records[1].label})
    assert item["index"] != 1 and len(item["failed"]) == 1 and records[1].path in item["failed"][0]
    assert item["opened"][0] == "x" and item["frames"].shape == (4, 32, 32, 3)
    assert torch.equal(item["frames"], dataset[(item["index"], 0)]["frames"])


class _Recorder:
    """A fake decoder and training loop writing the order of their calls to one log."""

    def __init__(self, fail_at=None):
        self.log, self.lock, self.fail_at = [], threading.Lock(), fail_at
        self.started = {}

    def note(self, what):
        with self.lock:
            self.log.append(what)

    def decode(self, batch):
        k = batch["k"]
        self.note(f"decode {k}")
        self.started.setdefault(k, threading.Event()).set()
        if k == self.fail_at:
            raise DataError(f"bad batch {k}")
        return {"k": k, "frames": torch.full((2,), k)}

    def wait_started(self, k, timeout=10):
        self.started.setdefault(k, threading.Event())
        return self.started[k].wait(timeout)


def test_decode_ahead_decodes_the_next_batch_while_this_one_trains():
    rec = _Recorder()
    ahead = DecodeAhead([{"k": k} for k in range(4)], rec.decode)
    for batch in ahead:
        k = batch["k"]
        rec.note(f"train {k}")
        if k < 3:  # while batch k trains, batch k+1 is decoded (on the decode thread)
            assert rec.wait_started(k + 1), f"batch {k + 1} was not decoded while batch {k} trained"
        rec.note(f"trained {k}")
    log = rec.log
    for k in range(4):
        assert log.index(f"decode {k}") < log.index(f"train {k}")
    for k in range(3):  # overlap: k+1 decoded before batch k's step ends ...
        assert log.index(f"decode {k + 1}") < log.index(f"trained {k}")
    for k in range(2):  # ... but never two ahead: k+2 waits until batch k+1 is taken, after step k
        assert log.index(f"decode {k + 2}") > log.index(f"trained {k}")


def test_decode_ahead_raises_the_decoders_error_and_stops_when_left():
    rec = _Recorder(fail_at=2)
    seen = []
    with pytest.raises(DataError, match="bad batch 2"):
        for batch in DecodeAhead([{"k": k} for k in range(5)], rec.decode):
            seen.append(batch["k"])
    assert seen == [0, 1]
    before = {t.name for t in threading.enumerate()}
    rec = _Recorder()
    for batch in DecodeAhead([{"k": k} for k in range(100)], rec.decode):
        if batch["k"] == 1:
            break  # a stop request or stop_after_steps: the generator is closed here
    assert not any(t.name == "tsmtrain-decode-ahead" for t in threading.enumerate() if t.name not in before)
    assert max(int(e.split()[1]) for e in rec.log if e.startswith("decode")) <= 2


@pytest.mark.slow
def test_training_through_the_gpu_path_equals_the_cpu_path_and_resumes_exactly(tmp_path, tiny_demo, monkeypatch):
    """A run whose clips come through the encoded path and DecodeAhead (forced on the CPU) trains
    the same weights as the CPU loader's run, bit for bit, also when stopped mid-epoch (the decode
    thread left with a batch ahead) and resumed; evaluation goes through the same path."""
    from tests.conftest import tiny_recipe
    from tsmtrain.recipe import load_recipe
    from tsmtrain.train import train

    def recipe(name, **sets):
        path = tiny_recipe(tmp_path / f"{name}.yaml", tiny_demo, name, dist={"engine": "none"})
        return load_recipe(path, [f"{k}={v}" for k, v in sets.items()])

    reference = train(recipe("cpu"))
    monkeypatch.setattr(VideoClipDataset, "decodes_on_gpu", property(lambda self: True))
    cut = train(recipe("gpu", **{"train.stop_after_steps": 5}))
    assert cut.step == 5
    resumed = train(recipe("gpu"), resume=True)
    assert resumed.step == reference.step
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.eval["top1"] == reference.eval["top1"]
