"""Benchmarks of the training step.

* :func:`bench_step` (``tsmtrain bench step RECIPE``): seconds per optimizer step (forward,
  loss, backward, optimizer step; :class:`~tsmtrain.train.step.TrainStep`, the training loop's
  own code) on a synthetic batch of the recipe's shape, no data loading, for TSM and TSN and for
  every variant of precision, memory format and compilation that runs on the device; and the
  temporal shift against a copy of the same tensor (:func:`bench_shift`).
* the allreduce benchmark is :mod:`tsmtrain.bench.allreduce`.

Timing on a shared machine drifts, so nothing is compared across minutes: every measured
round times each case of a variant once, back to back, in an order that rotates from round to
round, and the ratios (TSM/TSN, to fp32 TSN, shift/clone) are medians of the per-round ratios.
fp32 TSN is the reference and is timed in every round of every variant. In the fp32 rounds a
second fp32 TSN with the same weights (the *twin*) is timed too: the reference against its twin
(an A/A comparison, 1 in exact arithmetic) is the noise floor of the machine, printed next to the
ratios, with the quartiles of each variant's per-round TSM/TSN.
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

from ..data.modality import modality_of
from ..models import create_model
from ..models.shift import TemporalShift, temporal_shift
from ..optim import create_optimizer
from ..recipe import Recipe
from ..train.setup import choose_device, keep_freed_memory, set_threads
from ..train.step import TrainStep, half_precision_note

__all__ = ["Variant", "available_variants", "parse_variants", "bench_step", "bench_shift",
           "format_step_report"]


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
        # (random weights: a pretrained file changes nothing in the timing and need not exist here)
        self.model = create_model(recipe.model.model_copy(update={"shift": shift, "pretrained": None}),
                                  shape[1], shape[2]).to(device)
        optimizer = create_optimizer(self.model, recipe.optim)
        t0 = time.perf_counter()
        self.step = TrainStep(self.model, device, variant.precision, variant.channels_last, variant.compile,
                              batch_shape=shape, optimizer=optimizer)
        self.compile_s = time.perf_counter() - t0 if variant.compile else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step, as in the training loop (one rank, one backward pass, the optimizer's
        own learning rate)."""
        self.step(x, y)


def bench_step(recipe: Recipe, variants: list[Variant] | None = None, steps: int = 20, warmup: int = 3,
               budget_s: float = 300.0, shift_repeats: int = 30, say: Callable[[str], None] = lambda s: None) -> dict:
    """Time the training step of ``recipe``'s network as TSM and as TSN in each variant.

    The batch is ``train.batch_size`` synthetic clips ``(N, T, C_in, S, S)`` (T =
    ``data.num_segments``, S = ``data.input_size``) with random labels, the same every step; the
    optimizer is the recipe's; one process (no allreduce), on ``train.device`` with
    ``train.threads`` (default: all cores).

    Args:
        recipe: a recipe; its data files need not exist.
        variants: what to time (default :func:`available_variants`). fp32 without channels_last
            or compile is always timed: its TSN is the reference.
        steps: measured rounds per variant at most; each round times the variant's TSM, its TSN
            and the reference once, back to back, in an order that changes every round.
        warmup: untimed steps of each case first (after compilation), at most.
        budget_s: seconds a variant may take (warm-up and rounds, not compilation); past it the
            variant stops after at least 1 warm-up step and 3 rounds, so that a variant that is
            many times slower here (bf16 on a CPU without AVX-512) does not take hours.
        shift_repeats: rounds of the shift microbenchmark (:func:`bench_shift`).
        say: called with a line of progress now and then.

    Returns:
        ``{"environment": {...}, "input": {...}, "steps": S, "warmup": W, "variants": [{"name",
        "rounds", "tsm_s", "tsn_s" (median seconds per step), "tsm_clips_per_s", "tsn_clips_per_s",
        "tsm_over_tsn", "tsm_over_ref", "tsn_over_ref" (medians of per-round ratios),
        "tsm_over_tsn_quartiles" ([Q1, Q3] of the per-round TSM/TSN); fp32 also "ref_over_twin"
        and "ref_over_twin_quartiles", the A/A noise floor),
        "ref_clips_per_s" (the reference during this variant's rounds), "compile_s", "times"},
        ...], "shift": bench_shift(...)}``.
    """
    t, d = recipe.train, recipe.data
    device = choose_device(t.device, 0)
    threads = set_threads(t.threads, 1)
    kept = keep_freed_memory()  # as tsmtrain run does
    shape = (t.batch_size, d.num_segments, modality_of(d).in_channels, d.input_size, d.input_size)
    gen = torch.Generator().manual_seed(t.seed)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, recipe.model.num_classes, (t.batch_size,), generator=gen).to(device)
    variants = list(dict.fromkeys([Variant()] + list(variants or available_variants(device))))
    env = _environment(device, threads)
    env["freed_memory_kept"] = kept
    env["notes"] = [n for n in dict.fromkeys(half_precision_note(v.precision, device) for v in variants) if n]
    say(f"bench step on {env['device_name']} ({device}, {threads} threads): {recipe.model.arch}, "
        f"{t.batch_size} clips x {d.num_segments} frames x {d.input_size}x{d.input_size}, variants "
        f"{', '.join(v.name for v in variants)}")

    rows = _bench_variants(recipe, variants, x, y, device, steps, warmup, budget_s, say)
    say("shift microbenchmark")
    shift = bench_shift(_shift_inputs(recipe, shape), recipe.model.shift_div, device, shift_repeats,
                        num_segments=d.num_segments)
    return {"environment": env, "input": {"arch": recipe.model.arch, "shape": list(shape), "shift_div":
            recipe.model.shift_div, "optimizer": recipe.optim.name, "num_classes": recipe.model.num_classes},
            "steps": steps, "warmup": warmup, "budget_s": budget_s, "variants": rows, "shift": shift}


def _bench_variants(recipe: Recipe, variants: list[Variant], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    steps: int, warmup: int, budget_s: float, say: Callable[[str], None]) -> list[dict]:
    """:func:`bench_step`'s rows: the reference (fp32 TSN) warmed up once, then each variant's TSM
    and TSN (and in fp32 the A/A twin) timed against it (:func:`_time_variant`). ``x`` are the
    clips ``(N, T, 3, S, S)``, ``y`` the labels ``(N,)``."""
    shape = tuple(x.shape)
    ref = _Case(recipe, False, Variant(), device, shape)
    for _ in range(warmup):
        ref(x, y)
    rows = []
    for variant in variants:
        say(f"{variant.name}: building TSM and TSN{' (compiling)' if variant.compile else ''}")
        tsm = _Case(recipe, True, variant, device, shape)
        tsn = ref if variant == Variant() else _Case(recipe, False, variant, device, shape)
        cases = {"tsm": tsm, "tsn": tsn, "ref": ref}
        if variant == Variant():  # the A/A twin: the same network with the same weights
            cases["twin"] = _Case(recipe, False, Variant(), device, shape)
        rows.append(_time_variant(variant, cases, x, y, device, steps, warmup, budget_s, len(rows)))
        r = rows[-1]
        say(f"{variant.name}: TSM {r['tsm_clips_per_s']:.2f} clips/s, TSN {r['tsn_clips_per_s']:.2f} clips/s, "
            f"TSM/TSN {r['tsm_over_tsn']:.3f} ({r['rounds']} rounds)"
            + (f", A/A {r['ref_over_twin']:.3f}" if "ref_over_twin" in r else ""))
        del tsm, tsn, cases
    return rows


def _time_variant(variant: Variant, cases: dict, x, y, device, steps: int, warmup: int, budget_s: float,
                  seed: int) -> dict:
    """Warm up the variant's TSM and TSN (and the twin), then time rounds of (TSM, TSN, reference,
    twin if given) until ``steps`` rounds or ``budget_s`` (at least 1 warm-up step each and 3
    rounds)."""
    start = time.perf_counter()
    for case in [cases["tsm"], cases["tsn"]] + ([cases["twin"]] if "twin" in cases else []):
        for i in range(warmup):
            if i and time.perf_counter() - start > budget_s / 4:
                break
            case(x, y)
    times = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(seed)
    while len(times["tsm"]) < steps and (len(times["tsm"]) < 3 or time.perf_counter() - start < budget_s):
        rng.shuffle(order)
        seen = {}
        for key in order:
            if cases[key] not in seen:  # the fp32 variant's TSN is the reference: timed once
                seen[cases[key]] = _seconds(lambda: cases[key](x, y), device)  # noqa: B023 (called at once)
            times[key].append(seen[cases[key]])
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = (("tsm", "tsn"), ("tsm", "ref"), ("tsn", "ref")) + ((("ref", "twin"),) if "twin" in cases else ())
    per_round = {f"{a}_over_{b}": [p / q for p, q in zip(times[a], times[b])] for a, b in pairs}
    ratio = {k: statistics.median(v) for k, v in per_round.items()}
    quartiles = {f"{k}_quartiles": _quartiles(v) for k, v in per_round.items() if k in ("tsm_over_tsn", "ref_over_twin")}
    n = x.shape[0]
    compiled = {"tsm": cases["tsm"].compile_s, "tsn": cases["tsn"].compile_s} if variant.compile else None
    return dict(name=variant.name, precision=variant.precision, channels_last=variant.channels_last,
                compile=variant.compile, rounds=len(times["tsm"]), tsm_s=med["tsm"], tsn_s=med["tsn"],
                tsm_clips_per_s=n / med["tsm"], tsn_clips_per_s=n / med["tsn"], ref_clips_per_s=n / med["ref"],
                **ratio, **quartiles, compile_s=compiled, times=times)


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartile (the median of a single value is both)."""
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def _shift_inputs(recipe: Recipe, shape: tuple) -> list[tuple[int, ...]]:
    """``(N*T, C, H, W)`` of the input of every temporal shift of the network, in forward order,
    for batch ``shape``."""
    model = create_model(recipe.model.model_copy(update={"shift": True, "pretrained": None}), shape[1],
                         shape[2]).eval()
    found = []
    hooks = [m.register_forward_pre_hook(lambda m, args: found.append(tuple(args[0].shape)))
             for m in model.modules() if isinstance(m, TemporalShift)]
    with torch.no_grad():
        model(torch.zeros(1, *shape[1:]))
    for h in hooks:
        h.remove()
    return [(shape[0] * s[0],) + s[1:] for s in found]


def bench_shift(shapes: list[tuple[int, ...]], shift_div: int, device: torch.device, repeats: int = 30,
                num_segments: int = 8) -> dict:
    """The temporal shift against ``x.clone()`` on the same fp32 tensors, contiguous and
    channels_last: one tensor per shape in ``shapes`` (``(N*T, C, H, W)``; a network's shifted
    layers, :func:`_shift_inputs`).

    Forward: ``temporal_shift(x)`` vs ``x.clone()``. Forward+backward: ``f(x).backward(g)`` into
    ``x.grad`` (set to ``None`` before each), ``x`` a leaf that requires grad and ``g`` a gradient
    the benchmark keeps: the clone's backward hands ``g`` through and autograd copies it into
    ``x.grad`` (it cannot adopt a tensor the caller still holds), the shift's backward writes the
    opposite shift into a new tensor that ``x.grad`` adopts, so each side reads and writes the
    tensor once per direction, the least any operation that moves the data can do.
    Every round times each call on each tensor once, in an order that changes every round.

    Returns:
        ``{"shapes": [...], "num_segments": T, "repeats": R, "contiguous": {...},
        "channels_last": {...}}``; each layout has ``first`` (the first shape) and ``network``
        (all shapes, their times summed per round), each with median seconds ``shift_s``,
        ``clone_s``, ``shift_fb_s``, ``clone_fb_s`` and the medians of the per-round ratios
        ``forward`` (shift/clone) and ``forward_backward``.
    """
    out = {"shapes": [list(s) for s in shapes], "num_segments": num_segments, "repeats": repeats}
    gen = torch.Generator().manual_seed(0)
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        calls = {}
        for i, shape in enumerate(shapes):
            x = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
            g = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
            leaf = x.clone().requires_grad_()

            def fb(fn, leaf=leaf, g=g):
                leaf.grad = None
                fn(leaf).backward(g)

            calls[i, "shift_s"] = lambda x=x: temporal_shift(x, num_segments, shift_div)
            calls[i, "clone_s"] = lambda x=x: x.clone()
            calls[i, "shift_fb_s"] = lambda fb=fb: fb(lambda v: temporal_shift(v, num_segments, shift_div))
            calls[i, "clone_fb_s"] = lambda fb=fb: fb(lambda v: v.clone())
        for fn in calls.values():  # warm-up
            fn()
            fn()
        times = {k: [] for k in calls}
        order = list(calls)
        rng = random.Random(0)
        for _ in range(repeats):
            rng.shuffle(order)
            for key in order:
                times[key].append(_seconds(calls[key], device))
        kinds = ("shift_s", "clone_s", "shift_fb_s", "clone_fb_s")
        first = {k: times[0, k] for k in kinds}
        network = {k: [sum(times[i, k][r] for i in range(len(shapes))) for r in range(repeats)] for k in kinds}
        out[layout] = {name: _shift_summary(per_kind) for name, per_kind in (("first", first), ("network", network))}
    return out


def _shift_summary(times: dict[str, list[float]]) -> dict:
    row = {k: statistics.median(v) for k, v in times.items()}
    row["forward"] = statistics.median(a / b for a, b in zip(times["shift_s"], times["clone_s"]))
    row["forward_backward"] = statistics.median(a / b for a, b in zip(times["shift_fb_s"], times["clone_fb_s"]))
    return row


def format_step_report(result: dict) -> str:
    """:func:`bench_step`'s result as text: environment, one row per variant, the shift."""
    env, inp = result["environment"], result["input"]
    n, t, _, s, _ = inp["shape"]
    lines = [
        f"bench step: {inp['arch']}, {n} clips x {t} frames x 3x{s}x{s} per step, optimizer {inp['optimizer']}, "
        f"{inp['num_classes']} classes, synthetic batch (no data loading), one process",
        f"device {env['device']} ({env['device_name']}), {env['threads']} threads of {env['cores']} cores; "
        f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "")
        + ("; freed memory kept (glibc mallopt), as in tsmtrain run" if env.get("freed_memory_kept") else ""),
        f"medians of up to {result['steps']} rounds (a variant stops after {result['budget_s']:.0f} s, with at least "
        f"3) after up to {result['warmup']} warm-up steps; a round times TSM, TSN and ref = fp32 TSN back to back,",
        "and the ratios (of seconds per step; below 1 is faster) are medians of the rounds' ratios",
        "",
        f"{'variant':<28}{'rounds':>7}{'TSM clips/s':>12}{'TSN clips/s':>12}{'TSM/TSN':>9} {'Q1-Q3':>13}{'TSM/ref':>9}"
        f"{'TSN/ref':>9}{'ref clips/s':>13}",
    ]
    for r in result["variants"]:
        q1, q3 = r.get("tsm_over_tsn_quartiles") or (float("nan"), float("nan"))
        lines.append(f"{r['name']:<28}{r['rounds']:>7}{r['tsm_clips_per_s']:>12.2f}{r['tsn_clips_per_s']:>12.2f}"
                     f"{r['tsm_over_tsn']:>9.3f} {f'{q1:.3f}-{q3:.3f}':>13}{r['tsm_over_ref']:>9.3f}{r['tsn_over_ref']:>9.3f}"
                     f"{r['ref_clips_per_s']:>13.2f}"
                     + (f"   (compiled in {r['compile_s']['tsm']:.0f} s / {r['compile_s']['tsn']:.0f} s)"
                        if r["compile_s"] else ""))
    lines.append("(ref clips/s is the reference during each variant's rounds: how much the machine drifted)")
    lines.append("(Q1-Q3: the quartiles of the rounds' TSM/TSN)")
    twin = next((r for r in result["variants"] if "ref_over_twin" in r), None)
    if twin:
        q1, q3 = twin["ref_over_twin_quartiles"]
        lines.append(f"noise floor (A/A): fp32 TSN against an identical fp32 TSN, timed in the same rounds: median "
                     f"{twin['ref_over_twin']:.3f}, quartiles {q1:.3f}-{q3:.3f} (exactly 1 on a quiet machine)")
    lines += [f"note: {note}" for note in env.get("notes", [])]
    sh = result["shift"]
    lines += ["", f"temporal shift vs clone of the same fp32 tensors (T={sh['num_segments']}), medians of "
                  f"{sh['repeats']} rounds; first: {tuple(sh['shapes'][0])}, the first shifted layer's input; "
                  f"network: all {len(sh['shapes'])} shifted layers' inputs, summed per round",
              f"{'layout':<16}{'tensors':<9}{'shift ms':>10}{'clone ms':>10}{'shift/clone':>13}{'fwd+bwd ms':>12}"
              f"{'clone ms':>10}{'shift/clone':>13}"]
    for layout in ("contiguous", "channels_last"):
        for part in ("first", "network"):
            r = sh[layout][part]
            lines.append(f"{layout:<16}{part:<9}{1e3 * r['shift_s']:>10.3f}{1e3 * r['clone_s']:>10.3f}"
                         f"{r['forward']:>13.3f}{1e3 * r['shift_fb_s']:>12.3f}{1e3 * r['clone_fb_s']:>10.3f}"
                         f"{r['forward_backward']:>13.3f}")
    return "\n".join(lines)
