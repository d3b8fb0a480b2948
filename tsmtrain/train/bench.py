"""Benchmarks of the training step.

* :func:`bench_step` (``tsmtrain bench step RECIPE``): seconds per optimizer step (forward,
  loss, backward, optimizer step; :class:`~tsmtrain.train.step.TrainStep`, the training loop's
  own code) on a synthetic batch of the recipe's shape, no data loading, for TSM and TSN and for
  every variant of precision, memory format and compilation that runs on the device; and the
  temporal shift against a copy of the same tensor (:func:`bench_shift`).
* :func:`benchmark_allreduce`: a gradient allreduce on its own (``train.allreduce_benchmark``).

Timing on a shared machine drifts, so nothing is compared across minutes: every measured
round times each case of a variant once, back to back, in an order that rotates from round to
round, and the ratios (TSM/TSN, to fp32 TSN, shift/clone) are medians of the per-round ratios.
fp32 TSN is the reference and is timed in every round of every variant.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import Engine, LocalEngine
from ..models import create_model
from ..models.shift import TemporalShift, temporal_shift
from ..optim import create_optimizer
from ..recipe import Recipe
from .runtime import choose_device, set_threads
from .step import TrainStep

__all__ = ["benchmark_allreduce", "Variant", "available_variants", "parse_variants", "bench_step", "bench_shift",
           "format_step_report"]


def benchmark_allreduce(engine: Engine, model: torch.nn.Module, repeats: int, fp16: bool = False) -> dict:
    """Time a gradient allreduce on its own, not overlapped with backward.

    Every trainable parameter's gradient tensor (zeros where there is none) is allreduced the way
    ``hvd.DistributedOptimizer`` does it during backward (one named asynchronous allreduce per
    tensor, fused by Horovod), ``repeats`` times after a barrier each; the scaling model
    (:mod:`tsmtrain.scaling`) compares this with the wait measured in training to find how much
    of the allreduce backward hides.

    Returns:
        ``{"seconds": median over repeats of the mean over ranks, "times_s": [...], "repeats": R,
        "bytes": bytes sent into one allreduce (2 per value with fp16 compression, else 4),
        "parameters": number of parameters}``.
    """
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
             for p in model.parameters() if p.requires_grad]
    if fp16:
        grads = [g.half() for g in grads]
    times = []
    for _ in range(repeats):
        engine.barrier()
        t0 = time.perf_counter()
        handles = [engine.allreduce_async(g, name=f"allreduce_benchmark.{i}") for i, g in enumerate(grads)]
        for h in handles:
            engine.synchronize(h)
        if grads and grads[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = engine.allreduce(torch.tensor(times, dtype=torch.float64), average=True).tolist()
    return dict(seconds=sorted(times)[len(times) // 2], times_s=times, repeats=repeats,
                bytes=sum(g.numel() * g.element_size() for g in grads),
                parameters=sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- bench step


@dataclass(frozen=True)
class Variant:
    """One setting of ``train.precision``, ``train.channels_last`` and ``train.compile``."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        """``fp32``, ``bf16+channels_last``, ``fp32+compile``, ..."""
        return "+".join([self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile)


def available_variants(device: torch.device) -> list[Variant]:
    """The variants that run on ``device``: fp32, bf16 (on a GPU only where it supports bf16),
    fp16 (GPU only; on a CPU it runs but nothing makes it fast), each also in channels_last,
    and fp32 compiled (on a GPU also fp16 + channels_last compiled)."""
    cuda = device.type == "cuda"
    precisions = ["fp32"] + (["bf16"] if not cuda or torch.cuda.is_bf16_supported() else []) + (["fp16"] if cuda else [])
    found = [Variant(p) for p in precisions] + [Variant(p, channels_last=True) for p in precisions]
    found.append(Variant("fp32", compile=True))
    if cuda:
        found.append(Variant("fp16", channels_last=True, compile=True))
    return found


def parse_variants(text: str, device: torch.device) -> list[Variant]:
    """``fp32,bf16+channels_last,fp32+compile`` -> variants.

    Raises:
        ValueError: a name that is no variant (names the name and the ones that run here).
    """
    known = {v.name: v for v in available_variants(device)}
    everything = {Variant(p, cl, c).name: Variant(p, cl, c) for p in ("fp32", "bf16", "fp16")
                  for cl in (False, True) for c in (False, True)}
    chosen = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        if name not in everything:
            raise ValueError(f"{name!r} is not a variant; on {device.type} they are: {', '.join(known)} "
                             f"(precision fp32/bf16/fp16, then +channels_last, +compile)")
        chosen.append(everything[name])
    if not chosen:
        raise ValueError("no variant given")
    return list(dict.fromkeys(chosen))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _environment(device: torch.device, threads: int) -> dict:
    import torchvision

    env = {"device": str(device), "device_name": _device_name(device), "threads": threads,
           "cores": os.cpu_count(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version()}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env.update(mkldnn=torch.backends.mkldnn.is_available())
    return env


class _Case:
    """One network (TSM or TSN) in one variant, with its optimizer, ready to take steps."""

    def __init__(self, recipe: Recipe, shift: bool, variant: Variant, device: torch.device, shape: tuple):
        torch.manual_seed(recipe.train.seed)
        self.model = create_model(recipe.model.model_copy(update={"shift": shift}), shape[1]).to(device)
        t0 = time.perf_counter()
        self.step = TrainStep(self.model, device, variant.precision, variant.channels_last, variant.compile,
                              batch_shape=shape)
        self.compile_s = time.perf_counter() - t0 if variant.compile else None
        self.optimizer = create_optimizer(self.model, recipe.optim)
        self.engine = LocalEngine()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step, as in the training loop (one rank, one backward pass)."""
        self.step.forward_backward(x, y)
        self.engine.wait_gradients(self.optimizer)
        self.step.apply(self.engine, self.optimizer)


def bench_step(recipe: Recipe, variants: list[Variant] | None = None, steps: int = 10, warmup: int = 3,
               shift_repeats: int = 50, say: Callable[[str], None] = lambda s: None) -> dict:
    """Time the training step of ``recipe``'s network as TSM and as TSN in each variant.

    The batch is ``train.batch_size`` synthetic clips ``(N, T, 3, S, S)`` (T =
    ``data.num_segments``, S = ``data.input_size``) with random labels, the same every step; the
    optimizer is the recipe's; one process (no allreduce), on ``train.device`` with
    ``train.threads`` (default: all cores).

    Args:
        recipe: a recipe; its data files need not exist.
        variants: what to time (default :func:`available_variants`). fp32 without channels_last
            or compile is always timed: its TSN is the reference.
        steps: measured rounds per variant; each round times the variant's TSM, its TSN and the
            reference once.
        warmup: untimed steps of each case first (after compilation).
        shift_repeats: rounds of the shift microbenchmark (:func:`bench_shift`).
        say: called with a line of progress now and then.

    Returns:
        ``{"environment": {...}, "input": {...}, "steps": S, "warmup": W, "variants": [{"name",
        "tsm_s", "tsn_s" (median seconds per step), "tsm_clips_per_s", "tsn_clips_per_s",
        "tsm_over_tsn", "tsm_over_ref", "tsn_over_ref" (medians of per-round ratios),
        "ref_clips_per_s" (the reference during this variant's rounds), "compile_s", "times"},
        ...], "shift": bench_shift(...)}``.
    """
    t, d = recipe.train, recipe.data
    device = choose_device(t.device, 0)
    threads = set_threads(t.threads, 1)
    shape = (t.batch_size, d.num_segments, 3, d.input_size, d.input_size)
    gen = torch.Generator().manual_seed(t.seed)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, recipe.model.num_classes, (t.batch_size,), generator=gen).to(device)
    variants = list(dict.fromkeys([Variant()] + list(variants or available_variants(device))))
    env = _environment(device, threads)
    say(f"bench step on {env['device_name']} ({device}, {threads} threads): {recipe.model.arch}, "
        f"{t.batch_size} clips x {d.num_segments} frames x {d.input_size}x{d.input_size}, variants "
        f"{', '.join(v.name for v in variants)}")

    ref = _Case(recipe, False, Variant(), device, shape)
    for _ in range(warmup):
        ref(x, y)
    rows = []
    for variant in variants:
        say(f"{variant.name}: building TSM and TSN{' (compiling)' if variant.compile else ''}")
        tsm = _Case(recipe, True, variant, device, shape)
        tsn = ref if variant == Variant() else _Case(recipe, False, variant, device, shape)
        cases = {"tsm": tsm, "tsn": tsn, "ref": ref}
        for case in (tsm, tsn):
            for _ in range(warmup):
                case(x, y)
        times = {k: [] for k in cases}
        order = list(cases)
        rng = random.Random(len(rows))
        for _ in range(steps):
            rng.shuffle(order)
            seen = {}
            for key in order:
                if cases[key] not in seen:  # the fp32 variant's TSN is the reference: timed once
                    seen[cases[key]] = _seconds(lambda: cases[key](x, y), device)
                times[key].append(seen[cases[key]])
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {f"{a}_over_{b}": statistics.median(p / q for p, q in zip(times[a], times[b]))
                 for a, b in (("tsm", "tsn"), ("tsm", "ref"), ("tsn", "ref"))}
        rows.append(dict(name=variant.name, precision=variant.precision, channels_last=variant.channels_last,
                         compile=variant.compile, tsm_s=med["tsm"], tsn_s=med["tsn"],
                         tsm_clips_per_s=t.batch_size / med["tsm"], tsn_clips_per_s=t.batch_size / med["tsn"],
                         ref_clips_per_s=t.batch_size / med["ref"], **ratio,
                         compile_s={"tsm": tsm.compile_s, "tsn": tsn.compile_s} if variant.compile else None,
                         times=times))
        say(f"{variant.name}: TSM {rows[-1]['tsm_clips_per_s']:.2f} clips/s, TSN {rows[-1]['tsn_clips_per_s']:.2f} "
            f"clips/s, TSM/TSN {rows[-1]['tsm_over_tsn']:.3f}")
        del tsm, tsn, cases
    say("shift microbenchmark")
    shift = bench_shift(_first_shift_input(recipe, shape), recipe.model.shift_div, device, shift_repeats,
                        num_segments=d.num_segments)
    return {"environment": env, "input": {"arch": recipe.model.arch, "shape": list(shape), "shift_div":
            recipe.model.shift_div, "optimizer": recipe.optim.name, "num_classes": recipe.model.num_classes},
            "steps": steps, "warmup": warmup, "variants": rows, "shift": shift}


def _first_shift_input(recipe: Recipe, shape: tuple) -> tuple[int, ...]:
    """``(N*T, C, H, W)`` of the input of the network's first temporal shift for batch ``shape``."""
    model = create_model(recipe.model.model_copy(update={"shift": True, "pretrained": None}), shape[1]).eval()
    found = []
    first = next(m for m in model.modules() if isinstance(m, TemporalShift))
    handle = first.register_forward_pre_hook(lambda m, args: found.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.zeros(1, *shape[1:]))
    handle.remove()
    return (shape[0] * found[0][0],) + found[0][1:]


def bench_shift(shape: tuple[int, ...], shift_div: int, device: torch.device, repeats: int = 50,
                num_segments: int | None = None) -> dict:
    """The temporal shift against ``x.clone()`` on the same fp32 tensor ``shape = (N*T, C, H, W)``,
    contiguous and channels_last.

    Forward: ``temporal_shift(x)`` vs ``x.clone()``. Forward+backward: ``f(x).backward(g)`` into
    ``x.grad`` (set to ``None`` before each), ``x`` a leaf that requires grad and ``g`` a gradient
    the benchmark keeps: the clone's backward hands ``g`` through and autograd copies it into
    ``x.grad`` (it cannot adopt a tensor the caller still holds), the shift's backward writes the
    opposite shift into a new tensor that ``x.grad`` adopts, so each side reads and writes the
    tensor once per direction, which is the least any operation that moves data can do.
    Each round times the four calls of a memory format in a rotating order.

    Returns:
        ``{"shape": [...], "num_segments": T, "repeats": R, "contiguous": {...},
        "channels_last": {...}}``, each with median seconds ``shift_s``, ``clone_s``,
        ``shift_fb_s``, ``clone_fb_s`` and the medians of the per-round ratios
        ``forward`` (shift/clone) and ``forward_backward``.
    """
    t = num_segments or 8
    out = {"shape": list(shape), "num_segments": t, "repeats": repeats}
    gen = torch.Generator().manual_seed(0)
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
        g = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
        leaf = x.clone().requires_grad_()

        def fb(fn):
            leaf.grad = None
            fn(leaf).backward(g)

        calls = {"shift_s": lambda: temporal_shift(x, t, shift_div), "clone_s": lambda: x.clone(),
                 "shift_fb_s": lambda: fb(lambda v: temporal_shift(v, t, shift_div)),
                 "clone_fb_s": lambda: fb(lambda v: v.clone())}
        for fn in calls.values():  # warm-up
            for _ in range(3):
                fn()
        times = {k: [] for k in calls}
        order = list(calls)
        rng = random.Random(0)
        for _ in range(repeats):
            rng.shuffle(order)
            for key in order:
                times[key].append(_seconds(calls[key], device))
        row = {k: statistics.median(v) for k, v in times.items()}
        row["forward"] = statistics.median(a / b for a, b in zip(times["shift_s"], times["clone_s"]))
        row["forward_backward"] = statistics.median(a / b for a, b in zip(times["shift_fb_s"], times["clone_fb_s"]))
        out[layout] = row
    return out


def format_step_report(result: dict) -> str:
    """:func:`bench_step`'s result as text: environment, one row per variant, the shift."""
    env, inp = result["environment"], result["input"]
    n, t, _, s, _ = inp["shape"]
    lines = [
        f"bench step: {inp['arch']}, {n} clips x {t} frames x 3x{s}x{s} per step, optimizer {inp['optimizer']}, "
        f"{inp['num_classes']} classes, synthetic batch (no data loading), one process",
        f"device {env['device']} ({env['device_name']}), {env['threads']} threads of {env['cores']} cores; "
        f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else ""),
        f"median of {result['steps']} rounds after {result['warmup']} warm-up steps; ratios are medians of "
        f"per-round ratios (TSM, TSN and fp32 TSN timed back to back)",
        "",
        f"{'variant':<28}{'TSM clips/s':>12}{'TSN clips/s':>12}{'TSM/TSN':>9}{'TSM/ref':>9}{'TSN/ref':>9}"
        f"{'ref clips/s':>13}",
    ]
    for r in result["variants"]:
        lines.append(f"{r['name']:<28}{r['tsm_clips_per_s']:>12.2f}{r['tsn_clips_per_s']:>12.2f}"
                     f"{r['tsm_over_tsn']:>9.3f}{r['tsm_over_ref']:>9.3f}{r['tsn_over_ref']:>9.3f}"
                     f"{r['ref_clips_per_s']:>13.2f}"
                     + (f"   (compiled in {r['compile_s']['tsm']:.0f} s / {r['compile_s']['tsn']:.0f} s)"
                        if r["compile_s"] else ""))
    lines.append("ratios are of seconds per step (below 1: faster); ref = fp32 TSN, timed in every round "
                 "(its clips/s per variant shows the machine's drift)")
    sh = result["shift"]
    lines += ["", f"temporal shift vs clone of the same fp32 tensor {tuple(sh['shape'])} (the first shifted layer's "
                  f"input, T={sh['num_segments']}), median of {sh['repeats']} rounds:",
              f"{'layout':<16}{'shift ms':>10}{'clone ms':>10}{'shift/clone':>13}{'fwd+bwd ms':>12}{'clone ms':>10}"
              f"{'shift/clone':>13}"]
    for layout in ("contiguous", "channels_last"):
        r = sh[layout]
        lines.append(f"{layout:<16}{1e3 * r['shift_s']:>10.3f}{1e3 * r['clone_s']:>10.3f}{r['forward']:>13.3f}"
                     f"{1e3 * r['shift_fb_s']:>12.3f}{1e3 * r['clone_fb_s']:>10.3f}{r['forward_backward']:>13.3f}")
    return "\n".join(lines)
