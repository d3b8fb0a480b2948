"""Print the worked example of the scaling model in docs/scaling.md: TSM-ResNet50 on Summit, the
setting of "Training Kinetics in 15 Minutes" (Lin, Gan, Han, arXiv:1910.00932, 2019).
docs/scaling.md's tables are this output (tests/test_scaling.py checks it):

    python scripts/summit_prediction.py

The model's inputs are written out below with their sources; the ones marked "assumption" were
not measured on Summit. The last part adds a data ceiling per node from loader rates per core
measured by ``tsmtrain bench data`` on this project's real clips, before and after
``tsmtrain prepare`` (the JSON records in ``benchmarks/``; see docs/data.md, "Preparing Kinetics", and
docs/performance.md, "Data speed"). The file-system part gives the file opens/s and read GB/s of
the run for videos in files and in 1 GiB tar shards (``tsmtrain prepare --shards``).
"""

import json
import math
from dataclasses import replace
from pathlib import Path

from tsmtrain.scaling import (KINETICS400_TRAIN_VIDEOS, PREPARED_VIDEO_BYTES, DataSpec, ScalingBasis, filesystem_load,
                              load_network, predict)

REPO = Path(__file__).resolve().parents[1]

CLIPS_PER_GPU = 8                 # paper: 12,288 clips on 1,536 GPUs
FRAMES_PER_CLIP = 8               # TSM 8 segments at 224x224
PARAMETERS = 24.3e6               # paper (tsmtrain model-info: 24.33 M)
GRADIENT_BYTES = PARAMETERS * 4   # fp32 gradients (fp16 compression would halve it)
# Compute, assumption: a V100 trains TSM-ResNet50 as fast per frame as ResNet-50 per image
# (same 4.1 G multiply-adds per 224x224 frame; the shift itself is memory moves). NVIDIA's
# DeepLearningExamples ResNet-50 v1.5 PyTorch README, DGX-1 16GB: 367 img/s on 1 V100 in FP32.
V100_FP32_IMAGES_PER_S = 367.0
OVERLAP = 0.5                     # assumption: half of the allreduce hidden behind backward
WORKERS = [6, 96, 384, 1536]
# Loader rates per core measured here (x86, not POWER9) on ../shared/clips: as served, and prepared.
DATA_BENCHES = {"source videos": "benchmarks/data-shared-clips-source.json",
                "prepared videos": "benchmarks/data-shared-clips-prepared.json"}

EPOCHS = 50                       # assumption: the TSM repository's Kinetics schedule
TRAIN_VIDEOS = KINETICS400_TRAIN_VIDEOS  # 246,245 (Kay et al. 2017: 306,245 - 20,000 - 40,000)
# Bytes per video, assumption: a 10 s Kinetics clip at the 64.0 kB/s of ../shared/clips after
# tsmtrain prepare (short side 256); the measurement is in tsmtrain/scaling/model.py.
VIDEO_BYTES = PREPARED_VIDEO_BYTES
PAPER_SECONDS = 14 * 60 + 13      # paper: 14 min 13 s on 1,536 GPUs
PAPER_ONE_NODE_SECONDS = 49 * 3600 + 55 * 60   # paper abstract: 49 h 55 min; one node of 6 V100s (TSM repository issue #28)


def main() -> None:
    network = load_network(REPO / "configs" / "networks" / "summit.yaml")
    step_compute = CLIPS_PER_GPU * FRAMES_PER_CLIP / V100_FP32_IMAGES_PER_S
    basis = ScalingBasis(
        compute_s_per_clip=step_compute / CLIPS_PER_GPU,
        forward_backward_s_per_clip=step_compute / CLIPS_PER_GPU,
        data_s_per_step=0.0,
        overlap_fraction=OVERLAP,
        gradient_bytes=GRADIENT_BYTES,
        mode="weak",
        batch_per_rank=CLIPS_PER_GPU,
        reference_workers=1,
    )
    print(f"compute {step_compute * 1e3:.1f} ms per step ({CLIPS_PER_GPU * FRAMES_PER_CLIP} frames at "
          f"{V100_FP32_IMAGES_PER_S:.0f} img/s), gradients {GRADIENT_BYTES / 1e6:.1f} MB, overlap {OVERLAP:.2f}\n")
    print("| algorithm | workers | nodes | step (ms) | allreduce (ms) | exposed (ms) | clips/s | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    steps_at_largest = {}
    for algorithm in ("hierarchical", "ring"):
        net = network.model_copy(update={"algorithm": algorithm})
        for p in predict(basis, net, WORKERS):
            print(f"| {algorithm} | {p.workers} | {p.nodes} | {p.step_time_s * 1e3:.1f} | {p.allreduce_s * 1e3:.2f} "
                  f"| {p.breakdown_s['allreduce_exposed'] * 1e3:.2f} | {p.clips_per_s:,.0f} | {p.efficiency:.3f} |")
        steps_at_largest[algorithm] = p

    largest = WORKERS[-1]
    steps = EPOCHS * math.ceil(TRAIN_VIDEOS / (CLIPS_PER_GPU * largest))
    print(f"\nfull training on {largest} GPUs: {EPOCHS} epochs x {steps // EPOCHS} steps "
          f"(ceil({TRAIN_VIDEOS:,} / {CLIPS_PER_GPU * largest:,})) = {steps:,} steps")
    for algorithm, p in steps_at_largest.items():
        print(f"- predicted ({algorithm}): {steps * p.step_time_s:.0f} s ({_minutes(steps * p.step_time_s)})")
    print(f"- published: {PAPER_SECONDS} s ({_minutes(PAPER_SECONDS)})")
    clips = EPOCHS * TRAIN_VIDEOS
    paper_rate = clips / PAPER_SECONDS / largest
    one_node_rate = clips / PAPER_ONE_NODE_SECONDS / 6
    model_rate = steps_at_largest["hierarchical"].clips_per_s_per_rank
    print(f"\nclips/s per GPU: model {model_rate:.1f}; implied by the published times (same epochs, videos): "
          f"{paper_rate:.1f} on {largest} GPUs, {one_node_rate:.1f} on one node (6 GPUs), "
          f"ratio {paper_rate / one_node_rate:.2f}")

    print(f"\nwith a data ceiling per node = measured clips/s per core x {network.cores_per_node - network.ranks_per_node} "
          f"loader cores ({network.cores_per_node} cores - {network.ranks_per_node} ranks), hierarchical:\n")
    print("| data | clips/s per core | ceiling per node | 1536 GPUs: clips/s | limited by | full training |")
    print("|---|---:|---:|---:|---|---:|")
    for name, path in DATA_BENCHES.items():
        rate = json.loads((REPO / path).read_text())["clips_per_s_per_core"]
        net = network.with_data_ceiling(rate)
        (p,) = predict(basis, net, [largest])
        print(f"| {name} | {rate:.2f} | {net.data_clips_per_s_per_node:,.0f} | {p.clips_per_s:,.0f} | {p.limited_by} "
              f"| {steps * p.step_time_s:.0f} s ({_minutes(steps * p.step_time_s)}) |")

    # The file system: one file per video (tsmtrain prepare), with its frame table read too
    # (data.seek_mode: exact), or 1 GiB tar shards (tsmtrain prepare --shards); 6 loader workers per
    # rank (configs/tsm_r50_kinetics400.yaml's data.workers, the 36 loader cores of a node / 6 ranks).
    data = DataSpec(videos=TRAIN_VIDEOS, epochs=EPOCHS, video_bytes=VIDEO_BYTES)
    layouts = {"files": data, "files + frame tables": replace(data, sidecar_reads=1),
               "shards": replace(data, layout="shards")}
    print(f"\nfile system: {TRAIN_VIDEOS:,} videos x {EPOCHS} epochs of {VIDEO_BYTES / 1e3:.0f} kB, "
          f"{data.workers_per_rank} loader workers per rank, {data.shards} shards of 1 GiB; hierarchical, "
          f"no data ceiling, the file system's {network.filesystem.bandwidth_gb_per_s / 1e3:.1f} TB/s:\n")
    print("| GPUs | clips/s | epoch (s) | files: opens/s | files + frame tables: opens/s "
          "| shards: opens/s, 1st epoch | shards: opens/s, run mean | read GB/s | limited by |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    by_layout = {name: predict(basis, network, WORKERS, spec) for name, spec in layouts.items()}
    for i, n in enumerate(WORKERS):
        files, exact, shards = (by_layout[name][i].filesystem for name in layouts)
        _filesystem_row(str(n), by_layout["shards"][i].clips_per_s, files, exact, shards, by_layout["files"][i].limited_by)
    paper = EPOCHS * TRAIN_VIDEOS / PAPER_SECONDS
    _filesystem_row(f"{largest} at the published pace", paper,
                    *(filesystem_load(spec, largest, paper) for spec in layouts.values()), "(published)")
    total = {name: filesystem_load(spec, largest, 1.0).total_opens for name, spec in layouts.items()}
    loaders = largest * data.workers_per_rank
    print(f"\nopens of the whole run on {largest} GPUs: files {total['files']:,.0f}, files + frame tables "
          f"{total['files + frame tables']:,.0f}, shards {total['shards']:,.0f} (at most {loaders:,} workers x "
          f"{data.shards} shards = {loaders * data.shards:,})")


def _filesystem_row(gpus: str, clips: float, files, exact, shards, limited_by: str) -> None:
    print(f"| {gpus} | {clips:,.0f} | {files.epoch_s:,.1f} | {files.opens_per_s:,.0f} | {exact.opens_per_s:,.0f} "
          f"| {shards.opens_per_s:,.0f} | {shards.mean_opens_per_s:,.1f} | {files.read_gb_per_s:.2f} | {limited_by} |")


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


if __name__ == "__main__":
    main()
