import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tsmtrain.scaling import (
    DataSpec,
    FileSystemSpec,
    LinkSpec,
    NetworkError,
    NetworkSpec,
    ScalingBasis,
    allreduce_seconds,
    basis_from_sweep,
    epoch_seconds,
    expected_distinct_shards,
    file_opens_per_s,
    filesystem_load,
    hierarchical_allreduce_seconds,
    load_network,
    predict,
    read_gb_per_s,
    ring_allreduce_seconds,
    shard_count,
    shard_opens_in_epoch,
)

REPO = Path(__file__).resolve().parents[1]
SUMMIT = REPO / "configs" / "networks" / "summit.yaml"


def network(algorithm="hierarchical", ranks_per_node=4, intra=(100.0, 1.0), inter=(10.0, 5.0), ceiling=None):
    return NetworkSpec(name="test", ranks_per_node=ranks_per_node, algorithm=algorithm,
                       intra_node=LinkSpec(bandwidth_gb_per_s=intra[0], latency_us=intra[1]),
                       inter_node=LinkSpec(bandwidth_gb_per_s=inter[0], latency_us=inter[1]),
                       data_clips_per_s_per_node=ceiling)


# --------------------------------------------------------------------------- allreduce cost


def test_ring_allreduce_by_hand():
    # N=4, 100 MB, 10 GB/s, 5 us: 2*3/4 * 1e8 / 1e10 + 2*3 * 5e-6
    assert ring_allreduce_seconds(4, 1e8, 1e10, 5e-6) == pytest.approx(0.015 + 0.00003)
    # N=2, 1 GB, 1 GB/s, no latency: 2*1/2 * 1 s
    assert ring_allreduce_seconds(2, 1e9, 1e9, 0.0) == pytest.approx(1.0)


def test_ring_allreduce_one_worker_costs_nothing():
    assert ring_allreduce_seconds(1, 1e9, 1e9, 1e-3) == 0.0


@pytest.mark.parametrize("args", [(0, 1e6, 1e9, 0.0), (2, -1.0, 1e9, 0.0), (2, 1e6, 0.0, 0.0), (2, 1e6, 1e9, -1e-6)])
def test_ring_allreduce_rejects_impossible_inputs(args):
    with pytest.raises(ValueError):
        ring_allreduce_seconds(*args)


def test_hierarchical_within_one_node_is_the_intra_ring():
    intra, inter = LinkSpec(bandwidth_gb_per_s=50, latency_us=2), LinkSpec(bandwidth_gb_per_s=1, latency_us=100)
    # 3 ranks on a 4-rank node: 2*2/3 * 6e8 / 5e10 + 2*2 * 2e-6 = 0.016 + 0.000008
    assert hierarchical_allreduce_seconds(3, 6e8, 4, intra, inter) == pytest.approx(0.016008)
    # a full node: 2*3/4 * 6e8 / 5e10 + 2*3 * 2e-6 = 0.018 + 0.000012
    assert hierarchical_allreduce_seconds(4, 6e8, 4, intra, inter) == pytest.approx(0.018012)


def test_hierarchical_two_nodes_by_hand():
    intra, inter = LinkSpec(bandwidth_gb_per_s=100, latency_us=1), LinkSpec(bandwidth_gb_per_s=10, latency_us=5)
    # 8 ranks, 4 per node, 1e8 bytes:
    #   intra: 2*3/4 * 1e8 / 1e11 + 2*3 * 1e-6 = 0.0015 + 0.000006
    #   inter (2 nodes): 2*1/2 * 1e8 / 1e10 + 2*1 * 5e-6 = 0.01 + 0.00001
    assert hierarchical_allreduce_seconds(8, 1e8, 4, intra, inter) == pytest.approx(0.011516)


def test_flat_ring_across_nodes_runs_at_the_slowest_link():
    net = network("ring")
    # within a node: intra figures, 2*3/4 * 1e8 / 1e11 + 6 * 1e-6
    assert allreduce_seconds(4, 1e8, net) == pytest.approx(0.001506)
    # 8 ranks over 2 nodes: min bandwidth 10 GB/s, inter latency 5 us: 2*7/8 * 1e8 / 1e10 + 14 * 5e-6
    assert allreduce_seconds(8, 1e8, net) == pytest.approx(0.0175 + 0.00007)
    assert allreduce_seconds(8, 1e8, network("hierarchical")) == pytest.approx(0.011516)


# --------------------------------------------------------------------------- basis from a sweep


def record(workers, status="ok", wait=0.02, allreduce=0.08, batch=4, **bd):
    breakdown = {"data": 0.01, "augment": 0.02, "forward_backward": 0.30, "allreduce_wait": wait,
                 "optimizer": 0.04, "other": 0.02, **bd}
    measured = status == "ok"
    return {
        "workers": workers, "status": status, "error": None if measured else "exit status 1",
        "nodes": 1, "ranks_per_node": workers, "global_batch": batch * workers, "batch_per_rank": batch,
        "step_time_s": sum(breakdown.values()) if measured else None,
        "breakdown_s": breakdown if measured else None,
        "allreduce_s": (allreduce if workers > 1 else None) if measured else None,
        "gradient_bytes": 44_700_000 if measured else None,
    }


WEAK = {"mode": "weak", "batch_per_rank": 4, "global_batch": None}


def test_basis_from_sweep_overlap_and_compute_per_clip():
    records = [record(1), record(2, wait=0.05, allreduce=0.10), record(4, wait=0.02, allreduce=0.08),
               record(8, status="failed")]
    basis = basis_from_sweep(WEAK, records)
    assert basis.reference_workers == 4
    assert basis.overlap_fraction == pytest.approx(1 - 0.02 / 0.08)  # the 4-worker point, not the 2-worker one
    assert basis.compute_s_per_clip == pytest.approx((0.02 + 0.30 + 0.04 + 0.02) / 4)
    assert basis.forward_backward_s_per_clip == pytest.approx(0.30 / 4)
    assert basis.data_s_per_step == pytest.approx(0.01)
    assert basis.gradient_bytes == 44_700_000
    assert basis.mode == "weak" and basis.batch_per_rank == 4


def test_basis_from_a_chosen_point():
    records = [record(1, forward_backward=0.10), record(4, forward_backward=0.30)]
    basis = basis_from_sweep(WEAK, records, reference_workers=1)
    assert basis.reference_workers == 1
    assert basis.compute_s_per_clip == pytest.approx((0.02 + 0.10 + 0.04 + 0.02) / 4)
    with pytest.raises(ValueError, match="--basis 2: the sweep has no ok point with 2 workers"):
        basis_from_sweep(WEAK, records, reference_workers=2)


def test_comparison_rows_set_the_model_against_the_measured_points():
    from tsmtrain.scaling.report import comparison_rows

    records = [record(1), record(2, allreduce=0.5), record(4, allreduce=1.0), record(8, status="failed")]
    predictions = [{"workers": n, "allreduce_s": a, "step_time_s": t}
                   for n, a, t in ((1, 0.0, 0.4), (2, 0.4, 0.9), (8, 2.0, 3.0))]
    rows = comparison_rows(records, predictions)
    assert [r["workers"] for r in rows] == [1, 2]  # 4: not predicted; 8: failed
    one, two = rows
    assert one["allreduce_diff"] is None and one["busbw_measured_gb_per_s"] is None  # one rank sends nothing
    assert two["allreduce_diff"] == pytest.approx((0.4 - 0.5) / 0.5)
    assert two["busbw_measured_gb_per_s"] == pytest.approx(44_700_000 / 0.5 * 2 * 1 / 2 / 1e9)
    assert two["step_diff"] == pytest.approx((0.9 - two["step_measured_s"]) / two["step_measured_s"])


def test_overlap_is_clipped_to_zero_and_one():
    assert basis_from_sweep(WEAK, [record(2, wait=0.5, allreduce=0.1)]).overlap_fraction == 0.0
    assert basis_from_sweep(WEAK, [record(2, wait=0.0, allreduce=0.1)]).overlap_fraction == 1.0


def test_no_multi_worker_point_gives_overlap_zero_with_a_note():
    basis = basis_from_sweep(WEAK, [record(1), record(2, status="failed")])
    assert basis.overlap_fraction == 0.0
    assert any("overlap fraction 0" in note for note in basis.notes)


def test_no_ok_point_is_an_error():
    with pytest.raises(ValueError, match="no ok point"):
        basis_from_sweep(WEAK, [record(1, status="failed"), record(2, status="submitted")])


def test_strong_sweep_keeps_the_global_batch():
    basis = basis_from_sweep({"mode": "strong", "batch_per_rank": None, "global_batch": 16},
                             [record(2, batch=8), record(4, batch=4)])
    assert basis.mode == "strong" and basis.global_batch == 16 and basis.batch_per_rank is None
    assert basis.compute_s_per_clip == pytest.approx(0.38 / 4)


# --------------------------------------------------------------------------- predictions


def basis(**kw):
    values = dict(compute_s_per_clip=0.1, forward_backward_s_per_clip=0.075, data_s_per_step=0.0,
                  overlap_fraction=0.0, gradient_bytes=1e8, mode="weak", batch_per_rank=8)
    values.update(kw)
    return ScalingBasis(**values)


def test_one_worker_has_efficiency_one_and_no_allreduce():
    (p,) = predict(basis(data_s_per_step=0.05), network(), [1])
    assert p.efficiency == pytest.approx(1.0)
    assert p.allreduce_s == 0.0 and p.breakdown_s["allreduce_exposed"] == 0.0
    assert p.step_time_s == pytest.approx(0.8 + 0.05)
    assert p.clips_per_s == pytest.approx(8 / 0.85)
    assert p.limited_by == "compute"


def test_efficiency_falls_with_workers_on_a_slow_network():
    slow = network(ranks_per_node=2, intra=(1.0, 10.0), inter=(0.1, 50.0))
    preds = predict(basis(), slow, [1, 2, 4, 16, 64])
    eff = [p.efficiency for p in preds]
    assert all(a > b for a, b in zip(eff, eff[1:])), eff
    assert preds[-1].limited_by == "network"
    # step = compute + exposed allreduce, nothing hidden with overlap 0
    last = preds[-1]
    assert last.step_time_s == pytest.approx(0.8 + last.allreduce_s)
    assert sum(last.breakdown_s.values()) == pytest.approx(last.step_time_s)


def test_overlap_hides_the_allreduce_only_behind_backward():
    net = network(ranks_per_node=1, inter=(0.1, 0.0))  # 2 ranks on 2 nodes: A = 1e8 / 1e8 = 1 s
    (p,) = predict(basis(overlap_fraction=1.0), net, [2])
    assert p.allreduce_s == pytest.approx(1.0)
    # backward = 2/3 of 8 clips * 0.075 s = 0.4 s can hide; 0.6 s stays exposed
    assert p.breakdown_s["allreduce_exposed"] == pytest.approx(1.0 - 0.4)


def test_data_ceiling_binds():
    net = network(ranks_per_node=4, ceiling=20.0)  # 4 ranks x 8 clips / 0.8 s = 40 clips/s > 20 per node
    preds = predict(basis(), net, [1, 8])
    one, eight = preds
    assert one.limited_by == "compute" and one.efficiency == pytest.approx(1.0)
    assert eight.limited_by == "data"
    assert eight.clips_per_s == pytest.approx(2 * 20.0)
    assert eight.step_time_s == pytest.approx(64 / 40.0)
    assert sum(eight.breakdown_s.values()) == pytest.approx(eight.step_time_s)
    assert eight.efficiency == pytest.approx((40.0 / 8) / (8 / 0.8))


def test_strong_mode_divides_the_global_batch():
    preds = predict(basis(mode="strong", batch_per_rank=None, global_batch=24), network(), [1, 2, 16])
    assert [p.batch_per_rank for p in preds] == [24.0, 12.0, 1.5]
    assert all(p.global_batch == 24 for p in preds)
    assert preds[2].breakdown_s["compute"] == pytest.approx(1.5 * 0.1)


def test_predict_rejects_zero_workers():
    with pytest.raises(ValueError):
        predict(basis(), network(), [0])


# --------------------------------------------------------------------------- network files


def test_summit_network_loads():
    net = load_network(SUMMIT)
    assert net.ranks_per_node == 6 and net.algorithm == "hierarchical"
    assert net.inter_node.bandwidth == pytest.approx(23e9)
    assert net.intra_node.latency == pytest.approx(2e-6)


GOOD = """\
name: tiny
ranks_per_node: 2
intra_node:
  bandwidth_gb_per_s: 50
  latency_us: 1
inter_node:
  bandwidth_gb_per_s: 10
  latency_us: 2
"""


def write(tmp_path, text):
    path = tmp_path / "net.yaml"
    path.write_text(text)
    return path


def test_good_file_loads(tmp_path):
    assert load_network(write(tmp_path, GOOD)).inter_node.bandwidth_gb_per_s == 10


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("  latency_us: 2", "  latency_ns: 2"))
    with pytest.raises(NetworkError) as err:
        load_network(path)
    msg = str(err.value)
    assert f"{path}:8: inter_node.latency_ns" in msg and "unknown key" in msg and "latency_us" in msg


def test_negative_bandwidth_names_key_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("bandwidth_gb_per_s: 10", "bandwidth_gb_per_s: -10"))
    with pytest.raises(NetworkError) as err:
        load_network(path)
    assert f"{path}:7: inter_node.bandwidth_gb_per_s = -10" in str(err.value)
    assert "greater than 0" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, GOOD.replace("ranks_per_node: 2", "ranks_per_node: many"))
    with pytest.raises(NetworkError, match=r"net.yaml:2: ranks_per_node = 'many'"):
        load_network(path)


def test_missing_key_names_key(tmp_path):
    path = write(tmp_path, GOOD.replace("  latency_us: 1\n", ""))
    with pytest.raises(NetworkError, match=r"intra_node.latency_us: required key is missing"):
        load_network(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, GOOD + "inter_node: [unclosed\n")
    with pytest.raises(NetworkError) as err:
        load_network(path)
    assert str(err.value).startswith(f"{path}:") and "not valid YAML" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(NetworkError, match="nope.yaml: cannot read network file"):
        load_network(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- docs/scaling.md


def test_scaling_page_contains_the_summit_prediction():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "summit_prediction.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "| hierarchical | 1536 | 256 |" in out
    assert out.strip() in (REPO / "docs" / "scaling.md").read_text(), (
        "run scripts/summit_prediction.py and paste it into docs/scaling.md (Worked example)")


# --------------------------------------------------------------------------- data ceiling from a measured rate


def test_data_ceiling_from_a_rate_per_core_leaves_one_core_per_rank():
    net = network(ranks_per_node=4).model_copy(update={"cores_per_node": 20})
    ceiled = net.with_data_ceiling(2.5)
    assert ceiled.data_clips_per_s_per_node == pytest.approx(2.5 * (20 - 4))
    assert net.data_clips_per_s_per_node is None  # a copy: the loaded network is unchanged
    # a node computes 4 ranks x 8 clips / 0.8 s = 40 clips/s; 1 clip/s per core feeds it only 16
    slow = net.with_data_ceiling(1.0)
    (p,) = predict(basis(), slow, [8])
    assert p.limited_by == "data" and p.clips_per_s == pytest.approx(2 * 16.0)


def test_data_ceiling_needs_cores_per_node():
    with pytest.raises(NetworkError, match="cores_per_node is not set"):
        network().with_data_ceiling(3.0)
    with pytest.raises(NetworkError, match="leaves no core"):
        network(ranks_per_node=4).model_copy(update={"cores_per_node": 4}).with_data_ceiling(3.0)


def test_summit_cores_per_node():
    net = load_network(SUMMIT)
    assert net.cores_per_node == 42
    assert net.with_data_ceiling(2.0).data_clips_per_s_per_node == pytest.approx(72.0)


# --------------------------------------------------------------------------- the file system

# 96 ranks, 4 loader workers each, reading 12,000 videos of 500 kB for 3 epochs; shards of 100 MB
SMALL = DataSpec(videos=12_000, epochs=3, video_bytes=500_000, shard_bytes=100_000_000, workers_per_rank=4)


def no_allreduce():
    """8 clips per rank at 0.1 s each and no gradients: every step lasts 0.8 s at any N (on
    :func:`free` links)."""
    return basis(gradient_bytes=0.0)


def free(ceiling=None):
    """4 ranks per node and links without latency: an allreduce of nothing costs nothing."""
    return network(intra=(100.0, 0.0), inter=(10.0, 0.0), ceiling=ceiling)


def test_filesystem_load_by_hand():
    (files,) = predict(no_allreduce(), free(), [96], SMALL)
    (exact,) = predict(no_allreduce(), free(), [96], replace(SMALL, sidecar_reads=1))
    (shards,) = predict(no_allreduce(), free(), [96], replace(SMALL, layout="shards"))
    clips = 96 * 8 / 0.8                              # 960 clips/s
    epoch = 12_000 / clips                            # 12.5 s
    for p in (files, exact, shards):
        assert p.clips_per_s == pytest.approx(clips) and p.limited_by == "compute"
        assert p.filesystem.epoch_s == pytest.approx(epoch) and p.filesystem.run_s == pytest.approx(3 * epoch)
        assert p.filesystem.read_gb_per_s == pytest.approx(960 * 500_000 / 1e9)   # 0.48 GB/s
    # one file per video: an open per clip, two with the frame table, in every epoch
    assert files.filesystem.opens_per_s == pytest.approx(960) == files.filesystem.mean_opens_per_s
    assert exact.filesystem.opens_per_s == pytest.approx(1920) and exact.filesystem.total_opens == pytest.approx(72_000)
    # shards: S = ceil(12,000 x 5e5 / 1e8) = 60; k = 12,000 / (96 x 4) = 31.25 clips per worker and epoch
    s, k, loaders, q = 60, 31.25, 384, 59 / 60
    assert shards.filesystem.shards == s and shards.filesystem.clips_per_worker == pytest.approx(k)
    first = loaders * s * (1 - q ** k)
    total = loaders * s * (1 - q ** (3 * k))
    assert shards.filesystem.opens_per_s == pytest.approx(first / epoch)
    assert shards.filesystem.total_opens == pytest.approx(total)
    assert shards.filesystem.mean_opens_per_s == pytest.approx(total / (3 * epoch))
    # the epochs' opens: the formula per epoch, adding up to the run's
    by_epoch = [shard_opens_in_epoch(e, s, loaders, k) for e in (1, 2, 3)]
    assert by_epoch[0] == pytest.approx(first)
    assert by_epoch[1] == pytest.approx(loaders * s * (q ** k - q ** (2 * k)))
    assert sum(by_epoch) == pytest.approx(total) and by_epoch[0] > by_epoch[1] > by_epoch[2]


def test_filesystem_functions_by_hand():
    assert file_opens_per_s(100.0) == 100.0 and file_opens_per_s(100.0, 1) == 200.0
    assert shard_count(246_245, 640_000, 1 << 30) == 147          # 157.6 GB in 1 GiB shards
    assert shard_count(10, 1.0, 1 << 30) == 1
    assert read_gb_per_s(67_647, 640_000) == pytest.approx(43.29408)
    assert epoch_seconds(246_245, 67_647) == pytest.approx(3.64015, rel=1e-5)
    assert expected_distinct_shards(1, 5) == 1.0 and expected_distinct_shards(10, 0) == 0.0
    assert expected_distinct_shards(4, 2) == pytest.approx(4 * (1 - 0.75 ** 2))   # 1.75
    # at the published pace (50 x 246,245 clips in 853 s) one file per video is 14,434 opens/s
    load = filesystem_load(DataSpec(), 1536, 50 * 246_245 / 853)
    assert load.opens_per_s == pytest.approx(14_434, abs=1) and load.run_s == pytest.approx(853)


def test_expected_distinct_shards_against_a_simulation():
    rng = random.Random(19)
    shards, draws, trials = 50, 40, 2000
    # independent draws, where the formula is exact
    mean = sum(len({rng.randrange(shards) for _ in range(draws)}) for _ in range(trials)) / trials
    assert mean == pytest.approx(expected_distinct_shards(shards, draws), rel=0.02)
    # the loader's case: each epoch a permutation of 5,000 videos (shards of 100 consecutive ones),
    # dealt to 125 workers (40 each), every worker keeping the shards it has touched
    videos, workers, epochs, reps = 5_000, 125, 3, 8
    opened = [0.0] * epochs
    for _ in range(reps):
        touched = [set() for _ in range(workers)]
        for e in range(epochs):
            order = list(range(videos))
            rng.shuffle(order)
            for i, video in enumerate(order):
                shard, seen = video // (videos // shards), touched[i % workers]
                if shard not in seen:
                    seen.add(shard)
                    opened[e] += 1 / reps
    for e in range(epochs):
        assert opened[e] == pytest.approx(shard_opens_in_epoch(e + 1, shards, workers, videos / workers), rel=0.04)


def fs_network(opens=None, gb=None, ceiling=None):
    return free(ceiling).model_copy(
        update={"filesystem": FileSystemSpec(opens_per_s=opens, bandwidth_gb_per_s=gb)})


def test_filesystem_limits_cap_clips_per_s():
    # 960 clips/s wanted at 96 ranks (above); 500 opens/s allow 500 clips of one file each
    (p,) = predict(no_allreduce(), fs_network(opens=500), [96], SMALL)
    assert p.limited_by == "filesystem" and p.clips_per_s == pytest.approx(500)
    assert p.step_time_s == pytest.approx(96 * 8 / 500) and sum(p.breakdown_s.values()) == pytest.approx(p.step_time_s)
    assert p.filesystem.opens_per_s == pytest.approx(500)
    # with the frame tables, two opens per clip: 250 clips/s
    (p,) = predict(no_allreduce(), fs_network(opens=500), [96], replace(SMALL, sidecar_reads=1))
    assert p.clips_per_s == pytest.approx(250)
    # 0.1 GB/s of 500 kB videos: 200 clips/s, the tighter of the two limits
    (p,) = predict(no_allreduce(), fs_network(opens=500, gb=0.1), [96], SMALL)
    assert p.limited_by == "filesystem" and p.clips_per_s == pytest.approx(200)
    # shards: the first epoch's opens per clip bind, (384 x 60 x (1 - (59/60)^31.25)) / 12,000
    per_clip = 384 * 60 * (1 - (59 / 60) ** 31.25) / 12_000
    (p,) = predict(no_allreduce(), fs_network(opens=500), [96], replace(SMALL, layout="shards"))
    assert p.limited_by == "filesystem" and p.clips_per_s == pytest.approx(500 / per_clip)
    assert p.filesystem.opens_per_s == pytest.approx(500)


def test_filesystem_limits_that_do_not_bind():
    for net in (fs_network(opens=1e9, gb=1e6), free()):
        (p,) = predict(no_allreduce(), net, [96], SMALL)
        assert p.limited_by == "compute" and p.clips_per_s == pytest.approx(960)
    # without a DataSpec the file system is not modelled: no load, no cap
    (p,) = predict(no_allreduce(), fs_network(opens=1.0), [96])
    assert p.limited_by == "compute" and p.filesystem is None
    # the tighter of the data ceiling (4 ranks per node: 24 nodes x 20 = 480) and the file system wins
    (p,) = predict(no_allreduce(), fs_network(opens=500, ceiling=20.0), [96], SMALL)
    assert p.limited_by == "data" and p.clips_per_s == pytest.approx(480)
    (p,) = predict(no_allreduce(), fs_network(opens=400, ceiling=20.0), [96], SMALL)
    assert p.limited_by == "filesystem" and p.clips_per_s == pytest.approx(400)


def test_data_spec_rejects_impossible_data():
    for bad in ({"layout": "tar"}, {"sidecar_reads": 2}, {"videos": 0}, {"workers_per_rank": 0},
                {"video_bytes": -1.0}, {"shard_bytes": 0}):
        with pytest.raises(ValueError):
            DataSpec(**bad)


def test_filesystem_section_loads_and_summit_has_one(tmp_path):
    net = load_network(write(tmp_path, GOOD + "filesystem:\n  opens_per_s: 20000\n  bandwidth_gb_per_s: 100\n"))
    assert net.filesystem.opens_per_s == 20_000 and net.filesystem.bandwidth_gb_per_s == 100
    assert load_network(write(tmp_path, GOOD)).filesystem is None
    assert load_network(SUMMIT).filesystem == FileSystemSpec(bandwidth_gb_per_s=2500)


@pytest.mark.parametrize("section, message", [
    ("filesystem:\n  opens_per_sec: 100\n", ":10: filesystem.opens_per_sec = 100: unknown key (did you mean 'opens_per_s'?)"),
    ("filesystem:\n  opens_per_s: -5\n", ":10: filesystem.opens_per_s = -5: Input should be greater than 0"),
    ("filesystem:\n  bandwidth_gb_per_s: fast\n", ":10: filesystem.bandwidth_gb_per_s = 'fast'"),
    ("filesystem: {}\n", ":9: filesystem: Value error, set opens_per_s, bandwidth_gb_per_s or both"),
    ("filesystem: 100\n", ":9: filesystem = 100"),
])
def test_filesystem_section_errors_name_key_and_line(tmp_path, section, message):
    path = write(tmp_path, GOOD + section)
    with pytest.raises(NetworkError) as err:
        load_network(path)
    assert f"{path}{message}" in str(err.value), str(err.value)


def test_emulated_networks_load_and_give_the_cap_as_the_ring_bandwidth():
    # configs/networks/emulated-*.yaml: one rank per node, the tbf cap as the inter-node bandwidth
    for rate, gbytes in (("100mbit", 0.0125), ("1gbit", 0.125)):
        net = load_network(REPO / "configs" / "networks" / f"emulated-{rate}.yaml")
        assert net.ranks_per_node == 1 and net.inter_node.bandwidth_gb_per_s == gbytes
        # 4 nodes, 45 MB: 2*3/4 x 45e6 / cap + 6 hops x 5 us
        assert allreduce_seconds(4, 45e6, net) == pytest.approx(1.5 * 45e6 / (gbytes * 1e9) + 6 * 5e-6)


def test_comparison_cells_give_times_in_ms_and_bandwidth_in_gb_per_s():
    from tsmtrain.scaling.report import _cmp_fmt

    assert _cmp_fmt("step_measured_s", 11.25) == "11250"  # ms, whole from 1,000 up
    assert _cmp_fmt("allreduce_predicted_s", 0.3577) == "357.7"
    assert _cmp_fmt("busbw_measured_gb_per_s", 0.008018) == "0.008018"  # not a time
    assert _cmp_fmt("step_diff", -0.41) == "-41%" and _cmp_fmt("allreduce_diff", None) == "-"
