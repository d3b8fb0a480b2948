"""A classifier sharded across ranks (model.head_parallel): the split, the initialisation, the
2-rank step against the whole head on one process (both engines, both losses, linear and MoE,
SGD and LARS), and the shards' checkpoints."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_child, run_cli, venv_env
from tests.head_parallel_worker import CASES, K, N, run_case
from tsmtrain.dist.base import LocalEngine
from tsmtrain.dist.head_parallel import HeadParallel, class_shard
from tsmtrain.models import FeatureClassifier, VideoNet, shard_classifier
from tsmtrain.train.head_slices import head_state

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k,size", [(7, 2), (10, 3), (4, 4), (100_003, 8)])
def test_class_shards_cover_the_classes_once_and_differ_by_at_most_one(k, size):
    shards = [class_shard(k, r, size) for r in range(size)]
    assert shards[0][0] == 0 and shards[-1][1] == k
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # contiguous, no gap or overlap
    sizes = [hi - lo for lo, hi in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_ranks_than_classes_is_refused():
    with pytest.raises(ValueError, match="3 classes cannot be split over 4 ranks"):
        class_shard(3, 0, 4)


@pytest.mark.parametrize("head", ["linear", "moe"])
def test_shards_start_from_the_same_head_whatever_the_split(head):
    k = 2500  # three initialisation blocks of 1024 classes
    whole = shard_classifier(FeatureClassifier(16, k, head), 0, k, seed=5).fc.state_dict()
    for size in (2, 3):
        parts = [shard_classifier(FeatureClassifier(16, k, head), *class_shard(k, r, size), seed=5).fc.state_dict()
                 for r in range(size)]
        for name, value in whole.items():
            assert torch.equal(torch.cat([p[name] for p in parts]), value), (size, name)
    other = shard_classifier(FeatureClassifier(16, k, head), 0, k, seed=6).fc.state_dict()
    assert not torch.equal(other["gates.weight" if head == "moe" else "weight"],
                           whole["gates.weight" if head == "moe" else "weight"])  # the seed matters
    if head == "linear":
        assert abs(whole["weight"].std().item() - 0.001) < 1e-4 and not whole["bias"].any()


def test_video_net_shard_keeps_the_whole_vocabulary_and_shrinks_its_head():
    model = VideoNet("resnet18", 10, 2, head="moe")
    shard_classifier(model, 4, 7, seed=0)
    assert model.num_classes == 10 and model.fc.num_classes == 3
    assert model.fc.gates.weight.shape == (3 * 2, 512)
    out = model(torch.zeros(1, 2, 3, 32, 32), classify=False)
    assert out.shape == (1, 512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_ranks(out: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**venv_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "head_parallel_worker.py"), "ddp", str(out)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)


def _horovod_ranks(out: Path) -> None:
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (make setup builds it)")
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           str(REPO / "tests" / "head_parallel_worker.py"), "horovod", str(out)]
    proc = run_child(cmd, timeout=600, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_sharded_head_on_two_ranks_equals_the_whole_head_on_one_process(tmp_path, engine):
    (_ddp_ranks if engine == "ddp" else _horovod_ranks)(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    n = N // 2
    for case in CASES:
        ref = run_case(LocalEngine(), *case, sharded=False)
        for r, got in enumerate(ranks):
            got = got[case]
            lo, hi = got["classes"]
            assert (lo, hi) == class_shard(K, r, 2)
            # the global batch's loss, on every rank
            assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), case
            for name, value in ref["weights"].items():
                if name.startswith("fc."):  # this rank's classes' rows
                    per_class = value.shape[0] // K
                    value = value[lo * per_class:hi * per_class]
                torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
            # the features' gradient: this rank's rows, times 2 (the engine then averages the backbone's)
            torch.testing.assert_close(got["feature_grad"] / 2, ref["feature_grad"][r * n:(r + 1) * n],
                                       rtol=1e-5, atol=1e-7, msg=str(case))
        assert not torch.equal(ranks[0][case]["weights"]["fc.bias"] if "fc.bias" in ref["weights"] else
                               ranks[0][case]["weights"]["fc.experts.bias"],
                               run_case(LocalEngine(), *case, sharded=False)["weights"].get(
                                   "fc.bias", torch.zeros(1)))  # the head shard is not the whole head


def test_shards_join_and_split_for_another_number_of_ranks(tmp_path):
    main = tmp_path / "checkpoint-00000004.pt"
    k, size = 9, 3
    ranges = [class_shard(k, r, size) for r in range(size)]
    whole = torch.arange(k * 2 * 3, dtype=torch.float32).view(k * 2, 3)  # 2 rows per class (MoE, M = 2)
    momentum = -whole
    for r, (lo, hi) in enumerate(ranges):
        shard = {"fc": {"gates.weight": whole[2 * lo:2 * hi]},
                 "optimizer": {"param_groups": [{"params": [0]}],
                               "state": {0: {"momentum_buffer": momentum[2 * lo:2 * hi], "step": torch.tensor(4.0)}}}}
        torch.save(shard, tmp_path / f"checkpoint-00000004.head-{r}-of-{size}.pt")
    state = {"head_shards": {"size": size, "ranges": ranges, "num_classes": k}}
    for lo, hi in [(0, 9), (0, 5), (5, 9), (2, 7)]:  # one process, or 2 ranks of another split
        fc, opt = head_state(main, state, lo, hi, torch.load)
        assert torch.equal(fc["gates.weight"], whole[2 * lo:2 * hi])
        assert torch.equal(opt["state"][0]["momentum_buffer"], momentum[2 * lo:2 * hi])
        assert opt["state"][0]["step"] == 4.0


def _run(*args, timeout=600, child=True) -> subprocess.CompletedProcess:
    """``tsmtrain ARGS``, exit status 0; ``child=False``: in this process through run_cli (one rank:
    no launcher starts anything, and a child would only add seconds of imports)."""
    if not child:
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    proc = run_child([sys.executable, "-m", "tsmtrain", *map(str, args)], timeout=timeout, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _sharded_recipe(folder, root, name, np_=2, lr=0.005, **train):
    """The tiny recipe of a 2-rank DDP run with the classifier sharded (``model.head_parallel``), seed 1."""
    from tests.conftest import tiny_recipe

    return tiny_recipe(folder / f"{name}-{np_}.yaml", root, name, dist={"engine": "ddp", "np": np_},
                       model={"head_parallel": True, "num_classes": 4}, optim={"base_lr": lr},
                       train={"seed": 1, **train})


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory, tiny_demo):
    """The run directory of a sharded 2-rank run stopped mid-epoch at step 4 (of 12); the tests
    resume copies of it, so that the 2-rank start that gets there is paid once."""
    folder = tmp_path_factory.mktemp("sharded")
    _run("run", _sharded_recipe(folder, tiny_demo, "parts", stop_after_steps=4))
    return folder / "runs" / "parts"


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bitwise_and_tests_on_one_rank(tmp_path, tiny_demo, stopped_at_4):
    import shutil

    from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
    from tsmtrain.train.head_slices import slice_files

    def recipe(name, **train):
        return _sharded_recipe(tmp_path, tiny_demo, name, **train)

    _run("run", recipe("whole"))
    shutil.copytree(stopped_at_4, tmp_path / "runs" / "parts")  # 12 steps in all: stopped mid-epoch at 4
    _run("run", recipe("parts"))  # resumed from step 4
    whole, parts = latest_checkpoint(tmp_path / "runs" / "whole"), latest_checkpoint(tmp_path / "runs" / "parts")
    assert whole.name == parts.name
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert "fc.weight" not in a["model"] and a["head_shards"]["ranges"] == [(0, 2), (2, 4)]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert [p.name for p in slice_files(whole)] == [p.name for p in slice_files(parts)] == [
        f"{whole.stem}.head-0-of-2.pt", f"{whole.stem}.head-1-of-2.pt"]
    for x, y in zip(slice_files(whole), slice_files(parts)):
        sx, sy = torch.load(x), torch.load(y)
        for name, value in sx["fc"].items():
            assert torch.equal(value, sy["fc"][name]), (x.name, name)
        for index, entry in sx["optimizer"]["state"].items():
            assert torch.equal(entry["momentum_buffer"], sy["optimizer"]["state"][index]["momentum_buffer"])
    # the 2-rank checkpoint tested by one process and by two: the same scores
    tested = tmp_path / "runs" / "whole" / "test" / "test-1clip-1crop"
    _run("test", recipe("whole"), "--np", "1", child=False)
    one = dict(np.load(tested / "scores.npz"))
    _run("test", recipe("whole"), "--np", "2")
    two = dict(np.load(tested / "scores.npz"))
    assert one["scores"].shape == (8, 4)
    np.testing.assert_allclose(one["scores"], two["scores"], rtol=1e-5, atol=1e-6)
    # and they are the scores of the sharded evaluation at the end of training (every video's
    # loss: the mean cross-entropy of the softmax scores)
    final = [json.loads(line) for line in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line][-1]
    labels = one["labels"]
    loss = -np.log(one["scores"][np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(final["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_multi_label_moe_head_sharded_over_two_horovod_ranks_validates_as_one_process_tests(tmp_path, tiny_demo):
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (make setup builds it)")
    from tests.conftest import tiny_recipe

    lists = {}
    for name in ("train", "val"):  # every other video also carries the other member of its pair
        rows = [line.split() for line in (tiny_demo / f"{name}.txt").read_text().splitlines() if line.strip()]
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("".join(f"{p} {y} {int(y) ^ 1}\n" if i % 2 else f"{p} {y}\n"
                                       for i, (p, y) in enumerate(rows)))
    path = tiny_recipe(tmp_path / "ml.yaml", tiny_demo, "ml", dist={"engine": "horovod", "np": 2},
                       data={"train_list": str(lists["train"]), "val_list": str(lists["val"])},
                       model={"loss": "sigmoid", "head": "moe", "head_parallel": True},
                       optim={"name": "lars", "base_lr": 0.05, "trust_coefficient": 0.02},
                       schedule={"epochs": 1, "warmup_epochs": 0})
    _run("run", path)
    run_dir = tmp_path / "runs" / "ml"
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_mAP" in line][-1]
    assert final["val_clips"] == 8
    # the sharded validation (every class's logits gathered) gives the figures of the whole head on one process
    _run("test", path, "--np", "1", child=False)
    summary = json.loads((run_dir / "test" / "test-1clip-1crop" / "summary.json").read_text())
    assert summary["mAP"] == pytest.approx(final["val_mAP"], rel=1e-5)
    assert summary["GAP20"] == pytest.approx(final["val_GAP20"], rel=1e-5)


def test_fp16_overflow_in_another_ranks_head_shard_skips_this_ranks_step():
    from tsmtrain.optim import create_optimizer
    from tsmtrain.recipe import OptimConfig
    from tsmtrain.train import TrainStep
    from tests.head_parallel_worker import TinyNet, batch

    class OtherRankOverflows(LocalEngine):  # one process standing in for a rank whose peer's head overflowed
        def allreduce(self, values, average=True):
            return values + 1 if values.dtype == torch.float64 and values.numel() == 1 else values.clone()

    for engine, moves in ((LocalEngine(), True), (OtherRankOverflows(), False)):
        torch.manual_seed(0)
        model = TinyNet("linear")
        cfg = OptimConfig(base_lr=0.5)
        hp = HeadParallel(engine, K, "softmax")
        step = TrainStep(model, torch.device("cpu"), "fp16", optimizer=create_optimizer(model, cfg, skip=model.fc),
                         head_optimizer=create_optimizer(model.fc, cfg), engine=engine, head_parallel=hp)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scale = step.loss_scale()
        step(*batch(0, "softmax"))
        moved = not torch.equal(before["fc.weight"], model.fc.weight)
        assert moved == moves and (step.loss_scale() == scale) == moves  # skipped: the scale is lowered
        assert torch.equal(before["backbone.weight"], model.backbone.weight) != moves  # the whole step


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_one_rank_with_the_joined_head(tmp_path, tiny_demo, stopped_at_4):
    import shutil

    from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
    from tsmtrain.train.head_slices import full_model_state

    def recipe(np_, lr, **train):
        return _sharded_recipe(tmp_path, tiny_demo, "r", np_, lr, **train)

    shutil.copytree(stopped_at_4, tmp_path / "runs" / "r")  # 2 ranks, lr 0.005, stopped at step 4
    two = latest_checkpoint(tmp_path / "runs" / "r")
    joined = full_model_state(two, load_checkpoint(two), load_checkpoint)["fc.weight"]
    fresh = shard_classifier(VideoNet("resnet18", 4, 4), 0, 4, seed=1).fc.weight.detach()
    assert not torch.allclose(joined, fresh, atol=1e-6)  # the 4 steps moved the head
    # one more step on one process, at a learning rate too small to move anything: the head it
    # ends with is the one it loaded, joined from the 2 ranks' shards
    done = _run("run", recipe(1, 1e-12, stop_after_steps=5), child=False)
    assert "written by 2 ranks, this run has 1" in done.stderr + done.stdout
    path = latest_checkpoint(tmp_path / "runs" / "r")
    one = load_checkpoint(path)
    assert one["step"] == 5 and one["head_shards"]["size"] == 1 and one["head_shards"]["ranges"] == [(0, 4)]
    torch.testing.assert_close(full_model_state(path, one, load_checkpoint)["fc.weight"], joined, rtol=0, atol=1e-9)
