"""How much of a TSM training step the temporal shift takes, and TSM against TSN.

Times forward + backward + SGD of TSM-ResNet-18 and TSN-ResNet-18 (2 clips x 8 frames at
112x112, 2 threads) in alternating order, prints the median step of each (milliseconds) and
their ratio, then profiles three steps of each with ``torch.profiler`` and prints the operators
by self CPU time: ``tsmtrain::temporal_shift`` (the native operator, forward and backward) is the
shift's whole cost. ``--arch resnet50`` for ResNet-50.

    python scripts/profile_shift.py [--arch resnet18] [--rounds 15]
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tsmtrain.models import VideoNet
from tsmtrain.train.setup import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    nets = {}
    for name, shift in (("TSM", True), ("TSN", False)):
        torch.manual_seed(0)
        nets[name] = VideoNet(args.arch, 400, 8, shift=shift, dropout=0.0)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in nets.items()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, 3, 112, 112, generator=gen), torch.randint(0, 400, (2,), generator=gen)

    def step(name: str) -> None:
        loss = torch.nn.functional.cross_entropy(nets[name](x), y)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    for name in nets:
        for _ in range(3):
            step(name)
    times = {k: [] for k in nets}
    for r in range(args.rounds):
        for name in (("TSM", "TSN") if r % 2 else ("TSN", "TSM")):
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.arch}: TSM {med['TSM'] * 1e3:.1f} ms, TSN {med['TSN'] * 1e3:.1f} ms per step, "
          f"TSM/TSN {med['TSM'] / med['TSN']:.3f} (medians of {args.rounds})")
    for name in nets:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(name)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shift = sum(e.self_cpu_time_total for e in events if "temporal_shift" in e.key)
        print(f"\n{name}: 3 steps, {total / 1e3:.0f} ms self CPU time; temporal shift {shift / 1e3:.1f} ms "
              f"({100 * shift / total:.2f}%)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
