"""Memory of a large classifier, whole on one process against sharded over 2 ranks
(``model.head_parallel``): head parameters, optimizer state and peak memory per rank, and the
loss of the same training steps both ways.

usage: python scripts/head_memory.py [--classes 100000] [--mixtures 2] [--dim 512] [--batch 32]
                                     [--steps 2] [--json FILE]

The head is YouTube-8M's Mixture of Experts (``model.head: moe``) on ResNet-18-sized features
(D = 512, as ``tsmtrain extract`` writes them), trained with the sigmoid loss and LARS, the
features standing in for the backbone's (random, the same on both sides). One process holds the
whole head; two ranks (``torchrun``, DDP over Gloo on this CPU) hold half of the classes each,
gather the global batch's features and score their classes
(:mod:`tsmtrain.dist.head_parallel`). Each side runs in its own processes, so that their peak
resident memory (``ru_maxrss``) is their own; the figure printed is the peak minus the process's
resident memory before the head was built (torch's own libraries), in bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One side (``--sharded``: this rank's half), writing its figures to ``--out``."""
    import torch

    from tsmtrain.dist.base import LocalEngine
    from tsmtrain.dist.head_parallel import HeadParallel
    from tsmtrain.models import FeatureClassifier, shard_classifier
    from tsmtrain.optim import create_optimizer
    from tsmtrain.recipe import OptimConfig
    from tsmtrain.train import TrainStep

    torch.set_num_threads(1)
    if args.sharded:
        from tsmtrain.dist.ddp import DDPEngine

        engine = DDPEngine()
    else:
        engine = LocalEngine()
    base = _rss_bytes()
    k = args.classes
    model = FeatureClassifier(args.dim, k, "moe", args.mixtures, dropout=0.0)
    hp = HeadParallel(engine, k, "sigmoid") if args.sharded else None
    lo, hi = (hp.lo, hp.hi) if hp else (0, k)
    shard_classifier(model, lo, hi, seed=0)  # the same head either way
    cfg = OptimConfig(name="lars", base_lr=0.1, trust_coefficient=0.02)
    if hp:
        sum_across = lambda t: engine.allreduce(t, average=False)  # noqa: E731
        step = TrainStep(model, torch.device("cpu"), optimizer=None, engine=engine, loss="sigmoid", head_parallel=hp,
                         head_optimizer=create_optimizer(model.fc, cfg, sum_across=sum_across))
        optimizer = step.head_optimizer
    else:
        step = TrainStep(model, torch.device("cpu"), optimizer=create_optimizer(model, cfg), engine=engine,
                         loss="sigmoid")
        optimizer = step.optimizer
    n = args.batch // engine.size
    losses = []
    for i in range(args.steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(args.batch, args.dim, generator=g)
        y = torch.zeros(args.batch, k)
        y[torch.arange(args.batch).repeat_interleave(3), torch.randint(0, k, (3 * args.batch,), generator=g)] = 1
        rows = slice(engine.rank * n, (engine.rank + 1) * n)
        losses.append(step(x[rows], y[rows], step=i).loss.item())
    params = sum(p.numel() * p.element_size() for p in model.fc.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"rank": engine.rank, "ranks": engine.size, "classes": (lo, hi), "head_parameter_bytes": params,
           "optimizer_state_bytes": state, "peak_bytes": peak - base, "losses": losses}
    Path(args.out, f"rank{engine.rank}.json").write_text(json.dumps(doc))
    engine.shutdown()


def _side(args, sharded: bool, out: Path) -> list[dict]:
    out.mkdir()
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--classes", str(args.classes),
          "--mixtures", str(args.mixtures), "--dim", str(args.dim), "--batch", str(args.batch),
          "--steps", str(args.steps)]
    if sharded:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
               sys.executable, *me, "--sharded"]
    else:
        cmd = [sys.executable, *me]
    subprocess.run(cmd, check=True, cwd=REPO)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--mixtures", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="global batch (clips)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        whole = _side(args, False, Path(tmp) / "whole")[0]
        ranks = _side(args, True, Path(tmp) / "sharded")
    mb = 2 ** 20
    print(f"MoE head, {args.classes} classes x {args.mixtures} mixtures on {args.dim}-d features, global batch "
          f"{args.batch}, LARS, {args.steps} steps")
    print(f"{'':24} {'head params MB':>15} {'optimizer MB':>13} {'peak MB':>9}  losses")
    for name, r in [("one process", whole)] + [(f"rank {r['rank']} of 2 {tuple(r['classes'])}", r) for r in ranks]:
        print(f"{name:24} {r['head_parameter_bytes'] / mb:15.1f} {r['optimizer_state_bytes'] / mb:13.1f} "
              f"{r['peak_bytes'] / mb:9.1f}  {', '.join(f'{x:.6f}' for x in r['losses'])}")
    ratio = {key: max(r[key] for r in ranks) / whole[key]
             for key in ("head_parameter_bytes", "optimizer_state_bytes", "peak_bytes")}
    diff = max(abs(a - b) / abs(b) for r in ranks for a, b in zip(r["losses"], whole["losses"]))
    print(f"per rank / one process: head parameters {ratio['head_parameter_bytes']:.3f}, optimizer state "
          f"{ratio['optimizer_state_bytes']:.3f}, peak memory {ratio['peak_bytes']:.3f}; "
          f"largest relative loss difference {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"one_process": whole, "ranks": ranks, "ratios": ratio,
                                               "loss_rel_diff": diff}, indent=1) + "\n")


if __name__ == "__main__":
    main()
