"""Local SGD on every rank, run by tests/test_local_sgd.py under torchrun or horovodrun.

usage: python tests/local_sgd_worker.py ENGINE OUT_DIR SYNC:PERIOD:START:PASSES ...

For each configuration in turn (one launch, one engine): :data:`STEPS` optimizer steps of a
small network (linear, BatchNorm, linear) through :class:`~tsmtrain.train.step.TrainStep` (SGD
with momentum and weight decay) and :class:`~tsmtrain.dist.local_sgd.LocalSGD`, each rank on
its own batches (:func:`batch`), in PASSES backward passes per optimizer step
(``dist.backward_passes_per_step``); the last step ends the epoch. Saves, per configuration and
rank (``OUT_DIR/SYNC-PERIOD-START-PASSES/rankR.pt``), the parameters and floating-point buffers
after each step (``states``), whether the models were averaged after it (``averaged``) and the
bytes it allreduced (``bytes``).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests` is a package of the root
from tests.dist_worker import small_net  # noqa: E402
from tsmtrain.dist import create_engine  # noqa: E402
from tsmtrain.dist.local_sgd import LocalSGD  # noqa: E402
from tsmtrain.train.step import TrainStep  # noqa: E402

STEPS = 7


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s 6 rows of optimizer step ``step``."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)


def train(engine, sync: str, period: int, start: int, passes: int) -> dict:
    """One configuration's record on this rank."""
    engine.local_sgd_from = None  # (the engine of the previous configuration: synchronous again)
    model = small_net()
    local = LocalSGD(engine, model, sync, period, start)  # before the step wraps the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    step = TrainStep(model, torch.device("cpu"), optimizer=opt, engine=engine, passes=passes)
    engine.broadcast_state(model, step.optimizer)
    states, averaged, sent = [], [], []
    for s in range(STEPS):
        x, y = batch(s, engine.rank)
        rows = len(y) // passes
        outs = [step(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows], step=s) for i in range(passes)]
        assert [o.stepped for o in outs] == [False] * (passes - 1) + [True]
        averaged.append(local.step_done(s + 1, epoch_end=s + 1 == STEPS))
        if s + 1 == STEPS:
            local.epoch_done(s + 1)
        sent.append(local.take_bytes())
        states.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})
    return {"states": states, "averaged": averaged, "bytes": sent, "grad_bytes": local.grad_bytes,
            "model_bytes": local.model_bytes}


def main() -> None:
    engine = create_engine(sys.argv[1])
    for config in sys.argv[3:]:
        sync, period, start, passes = config.split(":")
        record = train(engine, sync, int(period), int(start), int(passes))
        out = Path(sys.argv[2]) / config.replace(":", "-")
        out.mkdir(parents=True, exist_ok=True)
        torch.save(record, out / f"rank{engine.rank}.pt")


if __name__ == "__main__":
    main()
