"""Indexed tar shards (tsmtrain prepare --shards, data.root: DIR/index.json): the round trip to
the per-file copy, bitwise the same batches and training as from files, exact resume, SIGKILL
while packing, damaged and missing shards, array tasks, and bench data's file-open count."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import REPO, tiny_recipe
from tsmtrain.cli import app
from tsmtrain.data import RankSampler, VideoClipDataset, build_loader, read_list
from tsmtrain.data.loader import MultiClipDataset, collate_views
from tsmtrain.data.readers import create_reader
from tsmtrain.prep.encode import PrepareError, Settings, make_worklist, prepare
from tsmtrain.data.readers.tar import INDEX, ShardError, ShardIndex, TarShardReader
from tsmtrain.prep.tar_writer import WIDS_INDEX, merge_tar_shards, parse_size, pack_task

pytestmark = pytest.mark.video

SETTINGS = Settings(short_side=32)
SHARD_SIZE = 12_000  # bytes: the tiny demo's 32 videos (about 2.5 KB each) in 8 shards


def _plan(demo, out):
    return make_worklist([demo / "train.txt", demo / "val.txt"], demo, out)


def _recipe(path, root, name, **sections):
    """:func:`tiny_recipe` with ``data.root`` = ``root`` (a folder or a shard index), its lists beside it."""
    folder = root.parent if root.suffix == ".json" else root
    tiny_recipe(path, root, name, **sections)
    path.write_text(path.read_text().replace(f"{root}/", f"{folder}/"))
    return path


@pytest.fixture(scope="module")
def both(tiny_demo, tmp_path_factory):
    """The tiny demo prepared twice: one file per video, and into tar shards."""
    base = tmp_path_factory.mktemp("shards")
    prepare(_plan(tiny_demo, base / "files"), SETTINGS, jobs=2, progress=False)
    plan = _plan(tiny_demo, base / "tars")
    summary = pack_task(plan, SETTINGS, (0, 1), SHARD_SIZE, jobs=2, progress=False)
    assert summary.encoding.failed == 0 and summary.shards_written > 1
    merge_tar_shards(plan, SETTINGS, SHARD_SIZE, 1)
    return base / "files", base / "tars"


def test_every_video_is_in_one_shard_with_the_bytes_of_the_per_file_copy(both):
    files, tars = both
    index = ShardIndex.load(tars / INDEX)
    manifest = [json.loads(line) for line in (files / "manifest.jsonl").read_text().splitlines()]
    assert sorted(index.samples) == sorted(r["output"] for r in manifest)
    reader = TarShardReader(index)
    members = {}
    for number, shard in enumerate(index.shards):
        with tarfile.open(tars / shard["path"]) as tar:  # the tar headers, read by the standard library
            found = {m.name: (m.offset_data, m.size) for m in tar}
        assert len(found) == 4 * shard["samples"] and (tars / shard["path"]).stat().st_size == shard["bytes"]
        members.update({name: (number, where) for name, where in found.items()})
    keys = set()
    for rel, sample in index.samples.items():
        assert members[sample.key + ".mp4"] == (sample.shard, sample.video)  # the index agrees with the headers
        assert members[sample.key + ".frames.json"] == (sample.shard, sample.frame_mappings)
        video, mappings = reader.read(tars / rel)
        assert video == (files / rel).read_bytes()  # the same bytes as the per-file preparation
        assert mappings == (files / (rel + ".frames.json")).read_bytes()
        keys.add(sample.key)
    assert len(keys) == len(index.samples) == sum(s["samples"] for s in index.shards)  # each in exactly one shard
    assert reader.opened == [str(tars / s["path"]) for s in index.shards]  # each shard opened once
    wids = json.loads((tars / WIDS_INDEX).read_text())
    assert wids["__kind__"] == "wids-shard-index-v1"
    assert [(s["url"], s["nsamples"]) for s in wids["shardlist"]] == [(s["path"], s["samples"]) for s in index.shards]
    for name in ("train.txt", "val.txt"):
        assert (tars / name).read_text() == (files / name).read_text()
    assert not [p for p in (tars / ".staging").rglob("*.mp4")], "staged videos left after packing"


@pytest.mark.parametrize("seek_mode", ["auto", "exact"])
def test_batches_from_shards_equal_batches_from_files_on_two_ranks_over_two_epochs(both, seek_mode):
    files, tars = both
    sources = [(files, files), (tars, tars / INDEX)]
    sets = []
    for folder, root in sources:
        records = read_list(folder / "train.txt", root)
        prepared, store = create_reader(root, records)
        sets.append(VideoClipDataset(records, 4, train=True, seed=7, seek_mode=seek_mode, short_side=32,
                                     prepared=prepared, store=store))
    assert sets[0].store is None and sets[1].store is not None
    batches = 0
    for epoch in (0, 1):
        for rank in (0, 1):
            loaders = []
            for dataset in sets:
                sampler = RankSampler(len(dataset), rank, 2, shuffle=True, seed=7)
                sampler.set_epoch(epoch)
                loaders.append(build_loader(dataset, sampler, 3, 1, drop_last=True))
            for a, b in zip(*loaders, strict=True):
                assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["label"], b["label"])
                assert a["failed"] == b["failed"] == []
                batches += 1
    assert batches == 2 * 2 * 4  # 24 videos, 12 per rank, batches of 3
    views = []
    for folder, root in sources:  # tsmtrain test's multi-view clips, too
        records = read_list(folder / "val.txt", root)
        prepared, store = create_reader(root, records)
        views.append(collate_views([MultiClipDataset(records, 4, 2, prepared=prepared, store=store,
                                                     short_side=32)[i] for i in range(len(records))]))
    assert torch.equal(views[0]["frames"], views[1]["frames"])


@pytest.mark.slow
def test_training_from_shards_equals_training_from_files_and_resumes_exactly_mid_epoch(both, tmp_path):
    from tsmtrain.recipe import load_recipe
    from tsmtrain.train import train

    files, tars = both

    def recipe(name, root, **sets):
        path = _recipe(tmp_path / f"{name}.yaml", root, name, dist={"engine": "none"})
        return load_recipe(path, [f"{k}={v}" for k, v in sets.items()])

    from_files = train(recipe("files", files))
    cut = train(recipe("tars", tars / INDEX, **{"train.stop_after_steps": 5}))
    assert cut.step == 5  # 12 steps per epoch: stopped in the middle of the first
    resumed = train(recipe("tars", tars / INDEX), resume=True)
    assert resumed.step == from_files.step == 24
    for (name, a), b in zip(from_files.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # bitwise: the same clips in the same order, resumed exactly
    assert resumed.eval["top1"] == from_files.eval["top1"]


def _journaled_shards(out):
    journal = out / ".shards" / "tars-0-of-1.jsonl"
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_sigkill_while_packing_then_restart_gives_identical_shards_and_index(both, tiny_demo, tmp_path):
    _, reference = both
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "tsmtrain", "prepare", "--list", tiny_demo / "train.txt", "--list",
            tiny_demo / "val.txt", "--root", tiny_demo, "--out", out, "--short-side", "32", "--shards",
            "--shard-size", str(SHARD_SIZE), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(list(map(str, args)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("shard-*.tar")):
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)  # just after its first shard was renamed into place
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / INDEX).exists()
    for record in _journaled_shards(out):  # every shard counted as complete is complete
        assert (out / record["tar"]).stat().st_size == record["bytes"]
    done = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list((out / "shards").glob(".*part*"))
    assert (out / INDEX).read_bytes() == (reference / INDEX).read_bytes()
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted(p.name for p in (reference / "shards").iterdir())
    for name in names:
        assert (out / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes(), name
    again = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "0 prepared" in again.stderr and "0 written now" in again.stderr


def _copy(tars, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tars, copy)
    return copy


def test_missing_and_truncated_shards_are_named_before_training_with_their_videos(both, tmp_path):
    copy = _copy(both[1], tmp_path)
    index = ShardIndex.load(copy / INDEX)
    first, second = (copy / s["path"] for s in index.shards[:2])
    first.unlink()
    with open(second, "r+b") as f:
        f.truncate(second.stat().st_size // 2)
    held = sorted(rel for rel, s in index.samples.items() if s.shard == 0)
    path = _recipe(tmp_path / "r.yaml", copy / INDEX, "broken", dist={"engine": "none"})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # the first missing shard, and how many problems in all
    assert f"shard {first}: missing" in errors[0] and "the first of 2 problems with the data files" in errors[0]
    assert held[0] in errors[0] and "it holds" in errors[0]
    validate = CliRunner().invoke(app, ["validate", str(path)])  # the same check, with the truncated one
    assert validate.exit_code == 2 and f"shard {first}: missing" in validate.stderr
    shutil.copy(both[1] / first.relative_to(copy), first)  # the first one back: the truncated one is named
    text = CliRunner().invoke(app, ["validate", str(path)]).stderr
    assert f"shard {second}:" in text and "(truncated)" in text and "problems" not in text
    assert "Traceback" not in result.output and not (tmp_path / "runs" / "broken" / "metrics.jsonl").exists()
    with pytest.raises(ShardError, match="not a shard index"):
        ShardIndex.load(copy / "train.txt")
    (copy / "bad.json").write_text('{"kind": "tsmtrain-shard-index", "shards": []}')
    with pytest.raises(ShardError, match="malformed shard index"):
        ShardIndex.load(copy / "bad.json")


def test_a_damaged_sample_is_skipped_and_counted(both, tmp_path):
    copy = _copy(both[1], tmp_path)
    index = ShardIndex.load(copy / INDEX)
    rel, sample = next(iter(index.samples.items()))
    with open(index.shard_path(sample.shard), "r+b") as f:  # one byte of its video changed
        f.seek(sample.video[0] + 100)
        byte = f.read(1)
        f.seek(sample.video[0] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    records = read_list(copy / "train.txt", copy / INDEX)
    prepared, store = create_reader(copy / INDEX, records)  # same size: the check before training passes
    dataset = VideoClipDataset(records, 4, train=True, short_side=32, prepared=prepared, store=store)
    position = next(i for i, r in enumerate(records) if r.path == str(copy / rel))
    item = dataset[position]
    assert item["index"] != position and len(item["failed"]) == 1
    assert "CRC-32 mismatch" in item["failed"][0] and rel in item["failed"][0]


def test_a_damaged_prepared_file_is_skipped_and_counted_as_a_shard_sample_is(both, tmp_path):
    """The manifest's CRC-32 of each prepared file (output_crc32) is checked where the file is read."""
    from tsmtrain.data.decoding import VideoDecodeError
    from tsmtrain.data.readers.files import prepared_videos

    copy = _copy(both[0], tmp_path)
    records = read_list(copy / "train.txt", copy)
    prepared = prepared_videos(copy)
    path = records[0].path
    middle = os.path.getsize(path) // 2
    with open(path, "r+b") as f:  # one byte of the video's frames changed
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    dataset = VideoClipDataset(records, 4, train=True, short_side=32, prepared=prepared)
    item = dataset[0]
    assert item["index"] != 0 and len(item["failed"]) == 1
    assert "CRC-32 mismatch" in item["failed"][0] and path in item["failed"][0]
    with pytest.raises(VideoDecodeError, match="CRC-32 mismatch"):
        dataset.fetch(path)  # what a worker reads for decoding on the GPU
    assert dataset[1]["failed"] == []

def _edit_index(copy, edit):
    """Apply ``edit(doc)`` to the copy's index.json (written as merge_tar_shards writes it)."""
    doc = json.loads((copy / INDEX).read_text())
    edit(doc)
    (copy / INDEX).write_text(json.dumps(doc, separators=(",", ":")))
    return doc


def test_index_entries_outside_the_folder_or_the_shard_are_refused_when_loaded(both, tmp_path, monkeypatch):
    """issue 30, item 5: an index followed `../..`, absolute paths and negative offsets, and only
    the CRC rejected what it read; now the entry is refused, named, before any shard is opened."""
    copy = _copy(both[1], tmp_path)
    original = json.loads((copy / INDEX).read_text())
    first = original["shards"][0]["path"]
    rel0, sample0 = next(iter(original["videos"].items()))
    outside = tmp_path / "outside.tar"
    shutil.copy(copy / first, outside)
    (copy / "shards" / "link.tar").symlink_to(outside)
    opened = []
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or (_ for _ in ()).throw(AssertionError))
    cases = [
        (lambda d: d["shards"][0].update(path="../" * 6 + "etc/passwd"), "shards[0]: path '../../",
         "leaves the index's folder"),
        (lambda d: d["shards"][0].update(path=str(outside)), f"shards[0]: path '{outside}' is an absolute path", ""),
        (lambda d: d["shards"][0].update(path="shards/link.tar"), "shards[0]: path 'shards/link.tar' resolves to "
         f"{outside}, outside the index's folder", "(a symbolic link)"),
        (lambda d: d["videos"][rel0].update(offset=-512), f"videos[0] ('{rel0}'): offset -512", "whole number >= 0"),
        (lambda d: d["videos"][rel0].update(size=original["shards"][sample0["shard"]]["bytes"] + 1),
         f"videos[0] ('{rel0}'): offset {sample0['offset']} + size", "ends past the end of shard"),
        (lambda d: d["videos"].update({"../../x.mp4": d["videos"].pop(rel0)}),
         "('../../x.mp4'): '../../x.mp4' leaves", ""),
        (lambda d: d["videos"][rel0].update(video=[sample0["video"][0], sample0["size"]]),
         f"videos[0] ('{rel0}'): video [{sample0['video'][0]}, {sample0['size']}] is not", "inside the sample"),
    ]
    for edit, *expected in cases:
        (copy / INDEX).write_text(json.dumps(original))
        _edit_index(copy, edit)
        with pytest.raises(ShardError) as err:
            ShardIndex.load(copy / INDEX)
        (line,) = err.value.problems
        assert line.startswith(f"{copy / INDEX}: ") and all(e in line for e in expected), line
    assert opened == []  # refused at load: no shard was opened


def _size_1e15(both, tmp_path):
    """A copy of the shards whose index gives its first training video ``"size":1e15``."""
    copy = _copy(both[1], tmp_path)
    rel = read_list(copy / "train.txt", copy / INDEX)[0].path[len(str(copy)) + 1:]
    text = (copy / INDEX).read_text()
    size = json.loads(text)["videos"][rel]["size"]
    at = text.index(f'"{rel}":')
    end = text.index("}", at)
    (copy / INDEX).write_text(text[:at] + text[at:end].replace(f'"size":{size}', '"size":1e15') + text[end:])
    assert '"size":1e15' in (copy / INDEX).read_text()
    return copy, rel


def test_a_size_of_1e15_is_one_error_line_in_run_and_bench_data(both, tmp_path):
    """issue 30, item 4: `size: 1e15` in a shard index was a MemoryError in run and bench data."""
    copy, rel = _size_1e15(both, tmp_path)
    path = _recipe(tmp_path / "r.yaml", copy / INDEX, "huge", dist={"engine": "none"}, data={"workers": 0})
    bench = ["bench", "data", str(path), "--workers", "1", "--clips", "2", "--rounds", "1"]
    for args in (["run", str(path)], bench):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "MemoryError" not in result.output
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert f"{copy / INDEX}: videos[" in line and f"('{rel}'): size 1e+15: not a whole number >= 0" in line
    assert not (tmp_path / "runs" / "huge" / "metrics.jsonl").exists()

def test_array_tasks_then_merge_hold_the_same_videos_and_a_missing_task_is_named(tiny_demo, both, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_demo, root)
    (root / "train.txt").write_text("".join((tiny_demo / "train.txt").read_text().splitlines(True)[:5]))
    (root / "videos" / "train" / "broken.mp4").write_bytes(b"not a video")
    (root / "train.txt").write_text((root / "train.txt").read_text() + "videos/train/broken.mp4 1\n")
    plan = make_worklist([root / "train.txt"], root, tmp_path / "out")
    pack_task(plan, SETTINGS, (1, 2), SHARD_SIZE, jobs=2, progress=False)
    with pytest.raises(PrepareError, match=r"1 of 2 tasks have no shard journal.*0/2"):
        merge_tar_shards(plan, SETTINGS, SHARD_SIZE)
    pack_task(plan, SETTINGS, (0, 2), SHARD_SIZE, jobs=2, progress=False)
    with pytest.raises(PrepareError, match="--shard-size 5000"):
        merge_tar_shards(plan, SETTINGS, 5000)
    result = merge_tar_shards(plan, SETTINGS, SHARD_SIZE)
    assert (result.ok, result.failed, result.tasks) == (5, 1, 2)
    index, reference = ShardIndex.load(tmp_path / "out" / INDEX), ShardIndex.load(both[1] / INDEX)
    reader, ref_reader = TarShardReader(index), TarShardReader(reference)
    assert len(index.samples) == 5 and {Path(s["path"]).name[:20] for s in index.shards} == {
        "shard-00000-of-00002", "shard-00001-of-00002"}
    for rel in index.samples:
        assert reader.read(index.folder / rel) == ref_reader.read(reference.folder / rel)
    assert "broken" not in (tmp_path / "out" / "train.txt").read_text()


def test_shard_sizes_and_option_errors():
    assert parse_size("1GiB") == 1 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2 * 10 ** 9
    assert parse_size("1e9") == 10 ** 9 and parse_size(4096) == 4096
    for bad in ("big", "-1", "0", "1 parsec"):
        with pytest.raises(PrepareError, match="--shard-size"):
            parse_size(bad)
    result = CliRunner().invoke(app, ["prepare", "--list", "x.txt", "--root", ".", "--out", "o", "--shards",
                                      "--shard-size", "lots"])
    assert result.exit_code == 2 and "--shard-size 'lots'" in result.stderr


@pytest.mark.slow
def test_bench_data_from_shards_opens_each_shard_it_touches_once(both, tmp_path):
    from tsmtrain.bench.data import bench_data
    from tsmtrain.recipe import load_recipe

    files, tars = both
    rows = {}
    for name, root in (("files", files), ("tars", tars / INDEX)):
        result = bench_data(load_recipe(_recipe(tmp_path / f"{name}.yaml", root, name)), workers=[1, 2], clips=24,
                            rounds=2)
        assert result.layout == ("files" if name == "files" else "shards")
        rows[name] = {row["workers"]: row for row in result.loader}
    index = ShardIndex.load(tars / INDEX)
    train_shards = {index.sample(r.path).shard for r in read_list(tars / "train.txt", tars / INDEX)}
    for workers in (1, 2):
        tar, file = rows["tars"][workers], rows["files"][workers]
        assert tar["files_opened_per_worker"] == tar["distinct_files_per_worker"] <= len(train_shards)
        assert file["files_opened_per_worker"] == file["clips_per_worker"]  # one open per clip read
    assert rows["tars"][1]["distinct_files_per_worker"] == len(train_shards)  # one worker reads all 24 videos
