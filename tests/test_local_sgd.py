"""dist.sync: local_sgd (post-local SGD) with two ranks on this host, for both engines.

With H = 1 local SGD equals synchronous allreduce (SGD with momentum is linear in the
gradients, and BatchNorm's running statistics in the batch statistics); with H > 1 the ranks'
weights differ between averagings and are equal right after; the bytes allreduced per step
are the gradients' during the warm-up and the model's at an averaging; a run stopped between
averagings resumes to exactly the weights of an uninterrupted one; the recipe check refuses
what cannot run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import local_sgd_worker
from tests.conftest import run_child, tiny_recipe, venv_env
from tests.dist_worker import small_net
from tsmtrain.recipe import RecipeError, load_recipe
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch(engine: str, *args) -> subprocess.CompletedProcess:
    """Two ranks of ``args`` (a script and its arguments) under torchrun (ddp) or horovodrun."""
    if engine == "ddp":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", sys.executable]
    else:
        cmd = [str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable]
    proc = run_child([*cmd, *map(str, args)], timeout=600, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


CONFIGS = ("allreduce:1:0:1", "local_sgd:1:0:1", "local_sgd:3:2:1", "local_sgd:3:2:2")
"""What tests/local_sgd_worker.py trains, one launch per engine: SYNC:PERIOD:START:PASSES."""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """``worker(engine, config)``: each rank's record of tests/local_sgd_worker.py (all of
    :data:`CONFIGS` run in one launch per engine, on first use)."""
    done = {}

    def records(engine: str, config: str) -> list[dict]:
        if engine not in done:
            done[engine] = tmp_path_factory.mktemp(f"local_sgd_{engine}")
            launch(engine, REPO / "tests" / "local_sgd_worker.py", engine, done[engine], *CONFIGS)
        return [torch.load(done[engine] / config.replace(":", "-") / f"rank{r}.pt") for r in range(2)]

    return records


def params_equal(a: dict, b: dict) -> bool:
    names = [n for n, _ in small_net().named_parameters()]
    return all(torch.equal(a[n], b[n]) for n in names)


# ---- the recipe


def write(tmp_path: Path, **sections) -> Path:
    import yaml

    doc = {"data": {"root": str(tmp_path), "train_list": str(tmp_path / "train.txt")}, "model": {"num_classes": 4},
           "dist": {"engine": "ddp", "np": 2}, "schedule": {"epochs": 4}}
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refused(path: Path) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return {p.key: p.message for p in info.value.problems}


def test_recipe_fields_default_to_allreduce_and_refuse_what_cannot_run(tmp_path):
    r = load_recipe(write(tmp_path))
    assert (r.dist.sync, r.dist.local_sgd_period, r.dist.local_sgd_start) == ("allreduce", 8, 0.0)
    r = load_recipe(write(tmp_path, dist={"sync": "local_sgd", "local_sgd_period": 4, "local_sgd_start": 1.5}))
    assert (r.dist.sync, r.dist.local_sgd_period, r.dist.local_sgd_start) == ("local_sgd", 4, 1.5)

    assert "dist.local_sgd_period" in refused(write(tmp_path, dist={"local_sgd_period": 4}))  # without local_sgd
    assert "dist.local_sgd_period" in refused(write(tmp_path, dist={"sync": "local_sgd", "local_sgd_period": 0}))
    assert "dist.sync" in refused(write(tmp_path, dist={"sync": "local_sgd", "engine": "none", "np": 1}))
    assert "dist.sync" in refused(write(tmp_path, dist={"sync": "sometimes"}))
    why = refused(write(tmp_path, dist={"sync": "local_sgd"}, model={"num_classes": 4, "head_parallel": True}))
    assert list(why) == ["model.head_parallel"] and "local_sgd" in why["model.head_parallel"]
    why = refused(write(tmp_path, dist={"sync": "local_sgd"}, model={"num_classes": 4, "sync_bn": True}))
    assert list(why) == ["model.sync_bn"] and "local_sgd" in why["model.sync_bn"]
    why = refused(write(tmp_path, dist={"sync": "local_sgd", "local_sgd_start": 4}))
    assert list(why) == ["dist.local_sgd_start"] and "never start" in why["dist.local_sgd_start"]


def test_start_is_rounded_to_optimizer_steps():
    from tsmtrain.dist.local_sgd import start_step

    assert [start_step(x, 6) for x in (0, 0.34, 0.5, 1, 2.9)] == [0, 2, 3, 6, 17]


# ---- the engines (a small network, a few steps; one launch of ~15 s per engine)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_period_one_equals_synchronous_allreduce(worker, engine):
    sync = worker(engine, "allreduce:1:0:1")
    local = worker(engine, "local_sgd:1:0:1")
    assert local[0]["averaged"] == [True] * local_sgd_worker.STEPS
    for step, (a, b, s) in enumerate(zip(local[0]["states"], local[1]["states"], sync[0]["states"])):
        assert all(torch.equal(a[k], b[k]) for k in a), step  # averaged after every step
        for name, value in a.items():
            if step + 1 == local_sgd_worker.STEPS or "running" not in name:  # (allreduce averages BN at epoch ends)
                assert torch.allclose(value, s[name], rtol=1e-5, atol=1e-6), (step, name, (value - s[name]).abs().max())
    assert not torch.allclose(sync[0]["states"][-1]["0.weight"], small_net()[0].weight)  # the steps moved it
    # the ranks' batches differ: without any averaging their steps would part
    assert not torch.equal(sync[0]["states"][0]["1.running_mean"], sync[1]["states"][0]["1.running_mean"])


@pytest.mark.slow
@pytest.mark.parametrize("passes", [1, 2], ids=["one-pass", "accumulating"])
@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_ranks_differ_between_averagings_and_agree_right_after(worker, engine, passes):
    r0, r1 = worker(engine, f"local_sgd:3:2:{passes}")
    # steps 1-2 synchronous; local from step 3; averaged after 2 + 3 = 5 and at the epoch's end (7)
    averaged = [False, False, False, False, True, False, True]
    assert r0["averaged"] == r1["averaged"] == averaged
    assert [params_equal(a, b) for a, b in zip(r0["states"], r1["states"])] == [True, True, False, False, True,
                                                                                 False, True]
    for step in (4, 6):  # parameters and BatchNorm statistics alike
        assert all(torch.equal(r0["states"][step][k], r1["states"][step][k]) for k in r0["states"][step])
    # bytes per step: the gradients while synchronous, nothing between averagings, the model at one
    net = small_net()
    grads = sum(p.numel() * 4 for p in net.parameters())
    model = grads + sum(b.numel() * 4 for b in net.buffers() if b.is_floating_point())
    assert (r0["grad_bytes"], r0["model_bytes"]) == (grads, model)
    assert r0["bytes"] == [grads, grads, 0, 0, model, 0, model]
    # momentum stays each rank's own: after the averaging at step 5, step 6 parts them again
    assert not params_equal(r0["states"][5], r1["states"][5])


# ---- tsmtrain run --np 2: the byte figure in metrics.jsonl, exact resume between averagings


def run(recipe: Path) -> subprocess.CompletedProcess:
    proc = run_child([sys.executable, "-m", "tsmtrain", "run", str(recipe)], timeout=600, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_resume_between_averagings_is_exact(tmp_path, tiny_demo, engine):
    def write(name, **train):
        # 24 clips / (2 ranks x 2) = 6 steps; local from step round(0.34 x 6) = 2; averaged after 5, and 6 (epoch end)
        return tiny_recipe(tmp_path / f"{name}.yaml", tiny_demo, name, schedule={"epochs": 1, "warmup_epochs": 0.5},
                           data={"workers": 0}, dist={"engine": engine, "np": 2, "sync": "local_sgd",
                                                      "local_sgd_period": 3, "local_sgd_start": 0.34},
                           optim={"name": "sgd", "base_lr": 0.01, "base_batch": 4},
                           train={"seed": 3, "checkpoint_every": 1, **train})

    ref = run(write("ref"))
    assert "local SGD: gradients allreduced for the first 2 steps" in ref.stderr
    cut = write("cut", stop_after_steps=4)  # steps 3 and 4 were local: the ranks' models differ
    run(cut)
    state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "cut"))
    assert state["step"] == 4 and len(state["rank_states"]) == 2
    own = [s["model"] for s in state["rank_states"]]
    assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0])
    assert state["rank_states"][0]["optimizer"]["state"]  # each rank's momentum
    for name, value in state["model"].items():  # the checkpoint's model is the ranks' average
        if value.is_floating_point():
            assert torch.allclose(value, (own[0][name] + own[1][name]) / 2, rtol=1e-5, atol=1e-7), name

    cut.write_text(cut.read_text().replace("stop_after_steps: 4", "stop_after_steps: null"))
    again = run(cut)
    assert "at step 4" in again.stderr
    final_ref = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "ref"))
    final_cut = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "cut"))
    assert final_cut["step"] == final_ref["step"] == 6
    for name, a in final_ref["model"].items():
        assert torch.equal(a, final_cut["model"][name]), name
    for a, b in zip(final_ref["rank_states"], final_cut["rank_states"]):  # and every rank's momentum
        for index, entry in a["optimizer"]["state"].items():
            assert torch.equal(entry["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]), index

    records = [json.loads(line) for line in (tmp_path / "runs" / "ref" / "metrics.jsonl").read_text().splitlines()]
    sent = {r["step"]: r["allreduce_bytes_per_step"] for r in records if "allreduce_bytes_per_step" in r}
    grads = sent[1]
    assert grads > 40e6 and sent[2] == grads  # TSM-ResNet18's ~11.2 M float32 gradients
    assert sent[3] == sent[4] == 0 and sent[5] == sent[6] > grads  # the parameters and BatchNorm statistics
