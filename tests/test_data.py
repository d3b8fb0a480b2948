from pathlib import Path

import numpy as np
import pytest
import torch

from tsmtrain.data import DataError, ListFileError, RankSampler, VideoClipDataset, VideoRecord, collate_clips, read_list
from tests.conftest import make_video
from tsmtrain.data.manifest import ManifestError
from tsmtrain.data.decoding import VideoDecodeError


def test_read_list_with_comments_and_blank_lines(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# header\n\na/b c.mp4 1\nx.mp4 0\n")
    recs = read_list(f, "/data", num_classes=2)
    assert recs == [VideoRecord("/data/a/b c.mp4", 1), VideoRecord("/data/x.mp4", 0)]


def test_read_list_reports_every_bad_line(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("ok.mp4 0\nnolabel.mp4\nbad.mp4 x\nbig.mp4 7\n")
    with pytest.raises(ListFileError) as info:
        read_list(f, ".", num_classes=3)
    lines = info.value.problems
    assert [p.split(":")[1] for p in lines] == ["2", "3", "4"]
    assert all(str(f) in p for p in lines)
    with pytest.raises(ListFileError, match="cannot read"):
        read_list(tmp_path / "absent.txt", ".")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ListFileError, match="lists no video"):
        read_list(tmp_path / "empty.txt", ".")


def test_non_utf8_list_file_is_one_line_with_the_byte_offset(tmp_path):
    f = tmp_path / "l.txt"
    f.write_bytes(b"ok.mp4 0\ncaf\xe9.mp4 1\n")
    with pytest.raises(ListFileError) as info:
        read_list(f, ".")
    assert info.value.problems == [f"{f}: not UTF-8 text: byte 0xe9 at offset 12 (line 2)"]


def test_a_huge_bad_line_gives_a_short_message(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("ok.mp4 0\n" + "x" * 100_000 + "\n")
    with pytest.raises(ListFileError) as info:
        read_list(f, ".")
    (line,) = info.value.problems
    assert line.startswith(f"{f}:2: expected 'relative/path.ext label': 'xxx") and len(line) < len(str(f)) + 200


def test_shard_sampler_partitions_and_pads():
    shards = [RankSampler(10, r, 4, shuffle=True, seed=3).indices() for r in range(4)]
    assert all(len(s) == 3 for s in shards)  # padded to 12
    assert set(sum(shards, [])) == set(range(10))
    again = RankSampler(10, 1, 4, shuffle=True, seed=3)
    assert again.indices() == shards[1]
    again.set_epoch(1)
    assert again.indices() != shards[1]  # new permutation each epoch
    again.set_epoch(1, skip=2)
    assert [i for i, _ in again] == again.indices()[2:] and len(again) == 1
    evals = [RankSampler(10, r, 4, shuffle=False, pad=False).indices() for r in range(4)]
    assert sorted(sum(evals, [])) == list(range(10))


def test_dataset_returns_t_frames_and_is_deterministic(tmp_path):
    make_video(tmp_path / "v.mp4", frames=20, size=32)
    ds = VideoClipDataset([VideoRecord(str(tmp_path / "v.mp4"), 1)], num_segments=8, train=True, seed=5)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert a["frames"].shape == (8, 32, 32, 3) and a["frames"].dtype == torch.uint8
    assert torch.equal(a["frames"], b["frames"]) and a["label"] == 1 and a["failed"] == []
    resized = VideoClipDataset(ds.records, 8, train=False, frame_size=(16, 24))[0]
    assert resized["frames"].shape == (8, 16, 24, 3)


def test_corrupt_and_missing_videos_are_replaced_and_counted(tmp_path):
    good = make_video(tmp_path / "good.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    recs = [VideoRecord(str(corrupt), 0), VideoRecord(str(tmp_path / "missing.mp4"), 0), VideoRecord(str(good), 2)]
    ds = VideoClipDataset(recs, num_segments=4, train=True)
    item = ds[0]
    assert item["index"] == 2 and item["label"] == 2
    assert 1 <= len(item["failed"]) <= 2 and any("corrupt.mp4" in f for f in item["failed"])
    batch = collate_clips([ds[1], ds[2]])
    assert batch["frames"].shape == (2, 4, 32, 32, 3) and any("missing.mp4" in f for f in batch["failed"])
    broken = VideoClipDataset(recs[:2], num_segments=4, train=True, max_retries=3)
    with pytest.raises(DataError, match="could not be decoded"):
        broken[0]


def test_collate_refuses_mixed_sizes_with_advice(tmp_path):
    a = make_video(tmp_path / "a.mp4", size=32)
    b = make_video(tmp_path / "b.mp4", size=40)
    ds = VideoClipDataset([VideoRecord(str(a), 0), VideoRecord(str(b), 0)], 4, train=False)
    with pytest.raises(DataError, match="data.frame_size"):
        collate_clips([ds[0], ds[1]])


def test_prepared_videos_use_approximate_seeking_and_their_recorded_frame_counts(tmp_path, tiny_demo):
    """A dataset over videos tsmtrain prepare wrote: seek mode per file from the manifest, same
    frames as exact seeking, and a file changed after preparation is refused by name."""
    import json

    from tsmtrain.data.readers.files import prepared_videos
    from tsmtrain.data.manifest import MANIFEST
    from tsmtrain.prep.encode import Settings, make_worklist, prepare

    out = tmp_path / "prepared"
    prepare(make_worklist([tiny_demo / "val.txt"], tiny_demo, out), Settings(short_side=32), jobs=1, progress=False)
    prepared = prepared_videos(out)
    records = read_list(out / "val.txt", out)
    assert len(prepared) == len(records) == 8 and all(r.path in prepared for r in records)
    assert all(Path(p["frame_mappings"]).is_file() for p in prepared.values())

    auto = VideoClipDataset(records, 4, train=True, prepared=prepared, frame_size=(24, 24))
    exact = VideoClipDataset(records, 4, train=True, prepared=prepared, seek_mode="exact", frame_size=(24, 24))
    plain = VideoClipDataset(records, 4, train=True, frame_size=(24, 24))
    assert auto.open(records[0].path).seek_mode == "approximate"
    assert exact.open(records[0].path).seek_mode == "frame_mappings"
    assert plain.open(records[0].path).seek_mode == "exact"
    for key in [(0, 0), (3, 1), (7, 2)]:
        a, b, c = auto[key]["frames"], exact[key]["frames"], plain[key]["frames"]
        assert a.shape == (4, 24, 24, 3)
        assert torch.equal(a, b) and torch.equal(a, c)

    # a prepared file whose frame count no longer matches its record is refused, naming it
    changed = dict(prepared)
    changed[records[1].path] = {**prepared[records[1].path], "frames": 999}
    with pytest.raises(VideoDecodeError, match="recorded 999"):
        VideoClipDataset(records, 4, train=True, prepared=changed).open(records[1].path)
    assert prepared_videos(tmp_path) == {}  # no manifest: nothing prepared
    (out / MANIFEST).write_text((out / MANIFEST).read_text() + "{not json\n")
    with pytest.raises(ManifestError, match=f"{MANIFEST}:9"):
        prepared_videos(out)
    json.loads((out / MANIFEST).read_text().splitlines()[0])  # the good lines are untouched
