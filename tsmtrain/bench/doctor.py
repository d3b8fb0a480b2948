"""``tsmtrain doctor``: is this node ready to train a recipe, and how fast will it go?

:func:`run_doctor` runs every check in one process and returns a :class:`DoctorResult`: one
:class:`Row` per check (``ok``, ``skipped`` or ``fail``, a value, a detail, and whether the
recipe requires it) and the measured figures. It prints nothing; progress goes to ``say``.

Environment (always): Python; torch (version, the CUDA it was built with); CUDA available; the
NVIDIA driver (``nvidia-smi``, when it is on PATH); the GPUs (name, memory); NCCL in torch;
Horovod and whether it was built with NCCL (:func:`tsmtrain.dist.horovod.build_info`); MPI
(``mpirun`` on PATH, torch's MPI backend); Gloo in torch; which GPU decoders (NVDEC) decode on
GPU 0 (:func:`tsmtrain.data.decoding.gpu_decoders`).

With a recipe, measured in short runs (seconds each on a GPU node; the whole doctor takes well
under 5 minutes):

* **GPU decoding**: clips/s of the recipe's clip dataset decoded on GPU 0 by each GPU decoder
  that works there (:func:`loader_clips_per_s` with ``decode_device="cuda:0"``);
* **loader (CPU)**: clips/s per core of the recipe's loader with one worker
  (:func:`tsmtrain.bench.data.bench_data`, a short ``tsmtrain bench data``);
* **training step**: clips/s per GPU of the recipe's network as TSM and TSN, in the recipe's own
  precision and memory format, fp32 + channels_last and bf16 + channels_last, on a synthetic
  batch (:func:`tsmtrain.bench.step.bench_step`), and the peak GPU memory it allocated;
* **NCCL allreduce** of the recipe's gradient bytes across the node's GPUs, one process per GPU
  (:func:`allreduce_bandwidth`): algorithm bandwidth and bus bandwidth as nccl-tests reports them;
* **loader cores per GPU**: the verdict: step clips/s per GPU divided by loader clips/s per core,
  against the cores this process may use divided by the GPUs.

On a machine without CUDA every GPU row is ``skipped`` with the detail ``no CUDA device`` and
the rest runs. A row is *required* when the recipe needs what it checks (``train.device: cuda``
needs CUDA, GPUs and the step; ``data.decode_device: cuda`` a working ``data.decoder`` on the
GPU; ``dist.engine: horovod`` Horovod, with NCCL when it trains on GPUs; ``ddp`` Gloo, and NCCL on
GPUs; ``dist.launcher: mpi`` mpirun; a recipe decoding on the CPU its CPU loader); without a recipe, Python and torch,
and on a node with CUDA its GPUs and NCCL. A required row that is not ``ok`` is ``fail``, and
:attr:`DoctorResult.exit_status` is then 1.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from tsmtrain.scaling.model import bus_bandwidth  # absolute: this file also runs as the allreduce worker script

__all__ = ["Row", "DoctorResult", "run_doctor", "environment_rows", "required_checks", "loader_clips_per_s",
           "step_figures", "allreduce_bandwidth", "allreduce_worker", "gradient_bytes", "verdict_line",
           "NO_CUDA", "FIGURES", "RECORD_VERSION"]

RECORD_VERSION = 1
"""The value of the JSON record's ``tsmtrain_doctor`` key."""

NO_CUDA = "no CUDA device"
"""The detail of every GPU row on a machine without CUDA."""

FIGURES = ("loader_clips_per_s_per_core", "step_clips_per_s_per_gpu", "nvdec_clips_per_s",
           "allreduce_busbw_gb_per_s", "allreduce_algbw_gb_per_s", "allreduce_bytes", "peak_gpu_memory_bytes",
           "cores_per_gpu_needed", "cores_per_gpu_available")


@dataclass
class Row:
    """One check: ``status`` is ``"ok"``, ``"skipped"`` (it does not apply here: no CUDA device,
    no recipe, fewer than 2 GPUs, ...) or ``"fail"``; ``value`` what was found or measured,
    ``detail`` more of it or the reason it was skipped or failed; ``required``: the recipe needs it."""

    check: str
    status: str
    value: str = ""
    detail: str = ""
    required: bool = False


@dataclass
class DoctorResult:
    """What :func:`run_doctor` found: :attr:`rows` in the order printed, :attr:`figures` (each
    None when its check was skipped or failed; units in the keys: clips/s, GB/s, bytes), the
    recipe's path, the host, the start time (ISO 8601) and the seconds it took."""

    recipe: str | None
    rows: list[Row] = field(default_factory=list)
    figures: dict = field(default_factory=lambda: dict.fromkeys(FIGURES))
    host: str = field(default_factory=platform.node)
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    seconds: float = 0.0
    gpus: int = 0
    step_clips_per_s: float | None = None
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    @property
    def failed(self) -> list[Row]:
        """The required rows that failed."""
        return [r for r in self.rows if r.required and r.status == "fail"]

    @property
    def exit_status(self) -> int:
        """0 when every required row is ok (what was asked for works), else 1."""
        return 1 if self.failed else 0

    def record(self) -> dict:
        """The JSON record: ``{"tsmtrain_doctor": 1, "time", "host", "recipe", "seconds", "rows":
        [{"check", "status", "value", "detail", "required"}], "figures": {...}, "exit_status"}``."""
        return {"tsmtrain_doctor": RECORD_VERSION, "time": self.time, "host": self.host, "recipe": self.recipe,
                "seconds": round(self.seconds, 2), "rows": [asdict(r) for r in self.rows],
                "figures": self.figures, "exit_status": self.exit_status}

    def write(self, path: str | Path) -> None:
        """Write :meth:`record` to ``path`` as JSON (its folders are made).

        Raises:
            FileWriteError: it cannot be written (names ``path`` and why; :func:`tsmtrain.io.write_json`).
        """
        from ..io import write_json  # not at the top: this file also runs as a script (allreduce_bandwidth)

        write_json(path, self.record(), indent=2)


def _say_nothing(line: str) -> None:
    """The default progress callback: print nothing."""
    pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _uses_cuda(recipe) -> bool:
    """Whether the recipe trains on a GPU here (``train.device: cuda``, or ``auto`` with CUDA)."""
    device = recipe.train.device
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def required_checks(recipe) -> set[str]:
    """The checks a recipe needs (:class:`Row` ``check`` names, see the module docstring);
    without a recipe (None): Python and torch, and with CUDA the GPUs and NCCL."""
    needed = {"Python", "torch"}
    if recipe is None:
        return needed | ({"CUDA available", "GPUs", "NCCL (torch)"} if torch.cuda.is_available() else set())
    cuda, engine = _uses_cuda(recipe), recipe.dist.engine
    if recipe.data.decode_device == "cpu":  # with GPU decoding the workers only read bytes
        needed.add("loader (CPU)")
    if cuda:
        needed |= {"CUDA available", "GPUs", "training step"}
    if recipe.data.decode_device == "cuda":
        needed |= {"CUDA available", f"GPU decoding: {recipe.data.decoder}"}
    if engine == "horovod":
        needed.add("Horovod")
    if engine == "ddp":
        needed |= {"Gloo (torch)"} | ({"NCCL (torch)"} if cuda else set())
    if cuda and engine != "none" and torch.cuda.device_count() >= 2:
        needed.add("NCCL allreduce")
    if recipe.dist.launcher == "mpi":
        needed.add("MPI")
    return needed


def _run(cmd: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    """A probe (``nvidia-smi``, ``mpirun --version``): its exit status is the caller's to read.

    Raises:
        tsmtrain.child.ChildError: it could not be started or ran past ``timeout`` seconds."""
    from ..child import run  # (not at the top: the allreduce ranks run this file as a script)

    return run(cmd, timeout=timeout, check=False)


# --------------------------------------------------------------------------- environment


def environment_rows(horovod_needs_nccl: bool = False) -> list[Row]:
    """The environment's rows (nothing measured): Python, torch, CUDA available, NVIDIA driver,
    GPUs, NCCL (torch), Horovod, MPI, Gloo (torch); ``required`` not yet set. Horovod without
    NCCL fails when ``horovod_needs_nccl`` (a recipe that trains on GPUs with Horovod). Every
    subprocess (``nvidia-smi``, ``mpirun --version``) is given 10 seconds."""
    import torch.distributed as tdist

    cuda = torch.cuda.is_available()
    rows = [Row("Python", "ok", platform.python_version(), sys.executable),
            Row("torch", "ok", torch.__version__,
                f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (no CUDA)")]
    if cuda:
        rows.append(Row("CUDA available", "ok", f"yes, {torch.cuda.device_count()} GPU(s)",
                        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"))
    else:
        rows.append(Row("CUDA available", "skipped", "no", NO_CUDA + ("" if torch.version.cuda else
                                                                       " (torch is a CPU-only build)")))
    rows.append(_driver_row(cuda))
    rows.append(_gpus_row() if cuda else Row("GPUs", "skipped", "", NO_CUDA))
    if not cuda:
        rows.append(Row("NCCL (torch)", "skipped", "", NO_CUDA))
    elif tdist.is_nccl_available():
        rows.append(Row("NCCL (torch)", "ok", ".".join(map(str, torch.cuda.nccl.version())), "torch.cuda.nccl"))
    else:
        rows.append(Row("NCCL (torch)", "fail", "no", "torch.distributed was built without NCCL"))
    rows.append(_horovod_row(horovod_needs_nccl))
    rows.append(_mpi_row(tdist.is_mpi_available()))
    gloo = tdist.is_gloo_available()
    rows.append(Row("Gloo (torch)", "ok" if gloo else "fail", "yes" if gloo else "no",
                    "" if gloo else "torch.distributed was built without Gloo"))
    return rows


def _driver_row(cuda: bool) -> Row:
    from ..child import ChildError

    if shutil.which("nvidia-smi") is None:
        return Row("NVIDIA driver", "skipped", "", "nvidia-smi is not on PATH" if cuda else NO_CUDA)
    try:
        proc = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    except ChildError as err:
        return Row("NVIDIA driver", "fail", "", _first_line(err))
    versions = sorted(set(proc.stdout.split()))
    if proc.returncode != 0 or not versions:
        return Row("NVIDIA driver", "fail", "", f"nvidia-smi exited {proc.returncode}: "
                                                + (proc.stderr or proc.stdout).strip()[:200])
    return Row("NVIDIA driver", "ok", ", ".join(versions), "nvidia-smi")


def _gpus_row() -> Row:
    try:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # a broken driver or device
        return Row("GPUs", "fail", "", _first_line(err))
    names = [f"{p.name} ({p.total_memory / 2**30:.1f} GiB)" for p in props]
    counted = {n: names.count(n) for n in dict.fromkeys(names)}
    return Row("GPUs", "ok", ", ".join(f"{k} x {n}" for n, k in counted.items()),
               "; ".join(f"{i}: {n}, compute capability {p.major}.{p.minor}"
                         for i, (n, p) in enumerate(zip(names, props))))


def _horovod_row(needs_nccl: bool) -> Row:
    try:
        from ..dist.horovod import build_info

        info = build_info()
    except Exception as err:  # ImportError, or its library failing to load
        return Row("Horovod", "fail", "not installed", f"{_first_line(err)}; make setup builds it")
    nccl = info["nccl"]
    version = f"{nccl // 10000}.{nccl // 100 % 100}.{nccl % 100}" if nccl else "no"
    detail = ", ".join(f"{name} {'yes' if info[key] else 'no'}" for key, name in (("cuda", "CUDA"), ("mpi", "MPI"),
                                                                                 ("gloo", "Gloo")))
    if needs_nccl and not nccl:
        return Row("Horovod", "fail", f"{info['version']}, NCCL no",
                   f"{detail}; built without NCCL, so GPU gradients are reduced through the host: rebuild "
                   f"it with HOROVOD_GPU_OPERATIONS=NCCL (make setup does where nvcc is found)")
    return Row("Horovod", "ok", f"{info['version']}, NCCL {version}", detail)


def _mpi_row(torch_mpi: bool) -> Row:
    from ..child import ChildError

    mpirun = shutil.which("mpirun")
    tail = f"torch MPI backend {'yes' if torch_mpi else 'no'}"
    if mpirun is None:
        return Row("MPI", "skipped", "", f"mpirun is not on PATH; {tail}")
    try:
        out = _run([mpirun, "--version"])
        version = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""
    except ChildError as err:
        return Row("MPI", "fail", mpirun, f"{_first_line(err)}; {tail}")
    return Row("MPI", "ok", version or mpirun, f"{mpirun}; {tail}")


# --------------------------------------------------------------------------- measurements


def _clip_keys(size: int, clips: int) -> list[tuple[int, int]]:
    """``clips`` dataset keys ``(index, epoch)`` cycling through a list of ``size`` videos."""
    return [(i % size, i // size) for i in range(clips)]


def loader_clips_per_s(recipe, backend: str, decode_device: str, clips: int = 32) -> float:
    """Clips/s of the recipe's training loader (``data.workers`` workers, its batch size) with
    ``backend`` decoding on ``decode_device`` (``"cuda:0"``: NVDEC in this process, the workers
    only reading the files; ``"cpu"``: in the workers). The first batch is not timed (it starts
    the workers and the decoder); the clock stops after the last batch's frames are on the device.

    Raises:
        ValueError: fewer than 2 clips. Besides what building and reading the loader raises
            (:class:`tsmtrain.data.ListFileError`, :class:`tsmtrain.data.DataError`,
            ``ImportError`` for a backend that is not installed, ...).
    """
    from ..data import read_list
    from ..data.loader import build_loader, clip_dataset

    if clips < 2:
        raise ValueError(f"need at least 2 clips, got {clips}")
    d = recipe.data
    records = read_list(d.train_list, d.root, recipe.model.num_classes, multi_label=recipe.model.loss == "sigmoid")
    gpu = recipe.model_copy(update={"data": d.model_copy(update={"decoder": backend, "decode_device":
                                                                 "cpu" if decode_device == "cpu" else "cuda"})})
    dataset = clip_dataset(gpu, records, train=True, decode_device=decode_device, decoder=backend)
    batch = max(1, min(recipe.train.batch_size, clips // 2))
    loader = build_loader(dataset, _clip_keys(len(records), clips), batch, d.workers, drop_last=False)
    count, start = 0, None
    for b in loader:
        if start is None:  # the first batch: workers and decoder starting
            if decode_device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            continue
        count += len(b["label"])
    if decode_device != "cpu":
        torch.cuda.synchronize()
    if not count:
        raise ValueError(f"{clips} clips in batches of {batch}: nothing timed after the first batch")
    return count / (time.perf_counter() - start)


def step_figures(recipe, steps: int = 5, budget_s: float = 20.0, say: Callable[[str], None] = _say_nothing) -> dict:
    """The training step of ``recipe`` on its ``train.device`` (:func:`tsmtrain.bench.step.bench_step`
    on a synthetic batch of ``train.batch_size`` clips, ``steps`` rounds at most, ``budget_s``
    seconds per variant), for the recipe's own precision and memory format (uncompiled), fp32,
    fp32 + channels_last and bf16 + channels_last (where bf16 runs).

    Returns:
        ``{"clips_per_s": {variant: {"tsm": clips/s, "tsn": clips/s}}, "recipe_variant": name,
        "recipe_clips_per_s": clips/s of the recipe's variant (fp32 where it does not run on the
        device) with its ``model.shift``,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated over the benchmark (None on a
        CPU), "device": str}``.

    Raises:
        tsmtrain.train.TrainingError: ``train.device: cuda`` without a GPU.
    """
    from .step import Variant, available_variants, bench_step
    from ..train.setup import choose_device

    device = choose_device(recipe.train.device, 0)
    t = recipe.train
    own = Variant(t.precision, t.channels_last, False)
    runs_here = set(available_variants(device))
    own = own if own in runs_here else Variant()  # e.g. bf16 on a GPU without it: fp32
    variants = [v for v in dict.fromkeys([own, Variant("fp32", True), Variant("bf16", True)]) if v in runs_here]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = bench_step(recipe, variants, steps=steps, warmup=2, budget_s=budget_s, shift_repeats=2, say=say)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rates = {r["name"]: {"tsm": r["tsm_clips_per_s"], "tsn": r["tsn_clips_per_s"]} for r in result["variants"]}
    return {"clips_per_s": rates, "recipe_variant": own.name,
            "recipe_clips_per_s": rates[own.name]["tsm" if recipe.model.shift else "tsn"],
            "peak_gpu_memory_bytes": peak, "device": str(device)}


def gradient_bytes(recipe) -> int:
    """Bytes of the recipe's fp32 gradients: its network's trainable parameters x 4 (what one
    gradient allreduce moves per rank without ``dist.fp16_allreduce``)."""
    from ..data.modality import modality_of
    from ..models import count_parameters, create_model

    model = create_model(recipe.model.model_copy(update={"pretrained": None}), recipe.data.num_segments,
                         modality_of(recipe.data).in_channels)
    return 4 * count_parameters(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce_worker(rank: int, world: int, port: int, nbytes: int, iters: int, backend: str, timeout_s: float) -> None:
    """One rank of :func:`allreduce_bandwidth` (run in its own process): ``iters`` timed
    sum-allreduces of ``nbytes`` of fp32 after 2 untimed ones; rank 0 prints ``{"times_s": [...]}``
    (per allreduce, the slowest rank's seconds) as one JSON line."""
    from datetime import timedelta

    import torch.distributed as tdist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=timeout_s))
    x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    for _ in range(2):
        tdist.all_reduce(x)
    sync()
    times = []
    for _ in range(iters):
        tdist.all_reduce(torch.zeros(1, device=device))  # the ranks start together
        sync()
        t0 = time.perf_counter()
        tdist.all_reduce(x)
        sync()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"times_s": slowest.tolist()}), flush=True)
    tdist.destroy_process_group()


def allreduce_bandwidth(nbytes: int, ranks: int, backend: str = "nccl", iters: int = 5,
                        timeout_s: float = 60.0) -> dict:
    """Time an allreduce of ``nbytes`` bytes (fp32) across ``ranks`` processes on this host, one
    per GPU (``backend="nccl"``; ``"gloo"`` runs on the CPU), each a fresh Python started with
    ``subprocess`` that meets the others through a free TCP port on 127.0.0.1.

    Every process is killed when ``timeout_s`` seconds pass or as soon as one of them fails, so
    this never hangs: it returns or raises within ``timeout_s`` plus a second.

    Returns:
        ``{"ranks", "bytes", "seconds" (median over ``iters`` of the slowest rank's seconds),
        "algbw_gb_per_s" (bytes / seconds / 1e9), "busbw_gb_per_s" (:func:`tsmtrain.scaling.model.bus_bandwidth`, as
        nccl-tests), "times_s"}``.

    Raises:
        ValueError: fewer than 2 ranks.
        RuntimeError: a process failed (its exit status and the end of its stderr) or the
            processes did not finish within ``timeout_s``.
    """
    if ranks < 2:
        raise ValueError(f"an allreduce needs 2 ranks or more, got {ranks}")
    from ..child import DEVNULL, start

    port = _free_port()
    # this file run as a script: it imports torch and nothing of tsmtrain (seconds, not tens)
    code = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
    with tempfile.TemporaryDirectory(prefix="tsmtrain-doctor-") as tmp:
        outs = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(ranks)]
        procs = []
        try:
            for r, (out, err) in enumerate(outs):
                with open(out, "w") as o, open(err, "w") as e:
                    procs.append(start(  # dies with this thread, which waits for it
                        [sys.executable, "-c", code, str(r), str(ranks), str(port), str(nbytes), str(iters), backend,
                         str(timeout_s)], stdout=o, stderr=e, stdin=DEVNULL))
            _wait_all(procs, outs, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        lines = [line for line in outs[0][0].read_text().splitlines() if line.startswith('{"times_s"')]
    if not lines:
        raise RuntimeError("rank 0 printed no times")
    times = json.loads(lines[-1])["times_s"]
    seconds = statistics.median(times)
    algbw = nbytes / seconds / 1e9
    return {"ranks": ranks, "bytes": nbytes, "seconds": seconds, "algbw_gb_per_s": algbw,
            "busbw_gb_per_s": bus_bandwidth(algbw, ranks), "times_s": times}


def _wait_all(procs: list[subprocess.Popen], outs: list[tuple[Path, Path]], timeout_s: float) -> None:
    """Wait until every process has exited 0; raise RuntimeError at the first that did not, or
    when ``timeout_s`` passes (the caller kills what is left)."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        for r, p in enumerate(procs):
            if p.poll() not in (None, 0):
                tail = outs[r][1].read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"rank {r} exited {p.returncode}: {' | '.join(tail)[-400:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the allreduce did not finish within {timeout_s:g} s")
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if p.returncode != 0:
            tail = outs[r][1].read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"rank {r} exited {p.returncode}: {' | '.join(tail)[-400:]}")


# --------------------------------------------------------------------------- the doctor


def run_doctor(recipe=None, recipe_path: str | None = None, clips: int = 32, steps: int = 5, budget_s: float = 20.0,
               timeout_s: float = 60.0, say: Callable[[str], None] = _say_nothing) -> DoctorResult:
    """Check this node for ``recipe`` (a :class:`tsmtrain.recipe.Recipe`; None: the environment
    rows only, no data, no step, no allreduce).

    Args:
        recipe: the recipe (with its overrides applied); its ``data.generate`` dataset is built
            first when it is not there yet (:func:`tsmtrain.prep.datasets.prepare_dataset`).
        recipe_path: recorded in the result.
        clips: clips per data measurement (CPU loader, each GPU decoder), at least 2.
        steps: measured rounds of each step variant at most; ``budget_s``: seconds per variant.
        timeout_s: seconds the allreduce processes may take, start-up included.
        say: called with a line of progress now and then.

    Returns:
        A :class:`DoctorResult`. A check that fails is a ``fail`` row with the error's first line,
        never an exception (Ctrl-C still propagates).
    """
    start = time.perf_counter()
    result = DoctorResult(recipe=recipe_path)
    needed = required_checks(recipe)
    horovod_nccl = recipe is not None and recipe.dist.engine == "horovod" and _uses_cuda(recipe)
    say("environment")
    rows = environment_rows(horovod_needs_nccl=horovod_nccl)
    result.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if recipe is not None:
        say("preparing the data")
        prepared = _prepare(recipe)
        say("loader on the CPU")
        loader = _loader_row(recipe, clips, result, prepared)
    rows += _decoder_rows(recipe, clips, result, say)
    if recipe is not None:
        rows.append(loader)
        rows.append(_step_row(recipe, steps, budget_s, result, say))
        rows.append(_allreduce_row(recipe, timeout_s, result, say))
        rows.append(_verdict_row(result))
    for row in rows:
        row.required = row.check in needed
        if row.required and row.status == "skipped":
            row.status = "fail"
    result.rows = rows
    result.seconds = time.perf_counter() - start
    return result


def _prepare(recipe) -> str | None:
    """Build the recipe's ``data.generate`` dataset if needed; the error's first line, or None."""
    from ..prep.datasets import prepare_dataset

    try:
        prepare_dataset(recipe)
    except Exception as err:
        return _first_line(err)
    return None


def _loader_row(recipe, clips: int, result: DoctorResult, prepared: str | None) -> Row:
    from .data import bench_data

    if prepared is not None:
        return Row("loader (CPU)", "fail", "", f"data.generate: {prepared}")
    d = recipe.data
    decoder = "torchcodec" if d.decoder == "pynvvideocodec" else d.decoder  # the loader on the CPU
    cpu = recipe.model_copy(update={"data": d.model_copy(update={"decoder": decoder, "decode_device": "cpu"})})
    try:
        bench = bench_data(cpu, result.recipe or "", workers=[1], clips=max(2, clips), rounds=1)
    except Exception as err:
        return Row("loader (CPU)", "fail", "", _first_line(err))
    per_core = bench.clips_per_s_per_core
    result.figures["loader_clips_per_s_per_core"] = per_core
    return Row("loader (CPU)", "ok", f"{per_core:.1f} clips/s per core",
               f"{decoder}, 1 worker, {bench.clips} clips; raw decoder {bench.raw_clips_per_s:.1f} clips/s"
               + (f"; {len(bench.failed)} unreadable" if bench.failed else ""))


def _decoder_rows(recipe, clips: int, result: DoctorResult, say) -> list[Row]:
    """One row per GPU decoder: does it decode on GPU 0, and (with a recipe) at how many clips/s."""
    from ..data.decoding import gpu_decoders

    say("GPU decoders")
    rows, rates = [], {}
    for backend, reason in gpu_decoders("cuda:0").items():
        check = f"GPU decoding: {backend}"
        if reason == NO_CUDA:
            rows.append(Row(check, "skipped", "", NO_CUDA))
        elif reason is not None:
            rows.append(Row(check, "fail", "does not decode", reason))
        elif recipe is None:
            rows.append(Row(check, "ok", "decodes on cuda:0", "a 2-frame H.264 probe"))
        else:
            say(f"decoding on cuda:0 with {backend}")
            try:
                rates[backend] = loader_clips_per_s(recipe, backend, "cuda:0", clips)
            except Exception as err:
                rows.append(Row(check, "fail", "", _first_line(err)))
                continue
            rows.append(Row(check, "ok", f"{rates[backend]:.1f} clips/s on cuda:0",
                            f"the recipe's training loader, {recipe.data.workers} worker(s) reading"))
    if rates:
        result.figures["nvdec_clips_per_s"] = rates
    return rows


def _step_row(recipe, steps: int, budget_s: float, result: DoctorResult, say) -> Row:
    if not torch.cuda.is_available():
        return Row("training step", "skipped", "", NO_CUDA)
    gpu = recipe.model_copy(update={"train": recipe.train.model_copy(update={"device": "cuda"})})
    try:
        found = step_figures(gpu, steps=steps, budget_s=budget_s, say=say)
    except Exception as err:
        return Row("training step", "fail", "", _first_line(err))
    result.figures["step_clips_per_s_per_gpu"] = found["clips_per_s"]
    result.figures["peak_gpu_memory_bytes"] = found["peak_gpu_memory_bytes"]
    result.step_clips_per_s = found["recipe_clips_per_s"]
    net = f"{'TSM' if recipe.model.shift else 'TSN'}-{recipe.model.arch}"
    others = "; ".join(f"{v}: TSM {r['tsm']:.1f}, TSN {r['tsn']:.1f}" for v, r in found["clips_per_s"].items())
    return Row("training step", "ok", f"{found['recipe_clips_per_s']:.1f} clips/s per GPU ({net}, "
               f"{found['recipe_variant']})", f"{others}; peak memory {found['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")


def _allreduce_row(recipe, timeout_s: float, result: DoctorResult, say) -> Row:
    import torch.distributed as tdist

    if not torch.cuda.is_available():
        return Row("NCCL allreduce", "skipped", "", NO_CUDA)
    if result.gpus < 2:
        return Row("NCCL allreduce", "skipped", "", f"{result.gpus} GPU: needs 2 or more")
    if not tdist.is_nccl_available():
        return Row("NCCL allreduce", "fail", "", "torch.distributed was built without NCCL")
    try:
        nbytes = gradient_bytes(recipe)
        torch.cuda.empty_cache()  # the step's cached blocks, before the ranks allocate theirs
        say(f"NCCL allreduce of {nbytes / 1e6:.1f} MB across {result.gpus} GPUs")
        found = allreduce_bandwidth(nbytes, result.gpus, "nccl", timeout_s=timeout_s)
    except Exception as err:
        return Row("NCCL allreduce", "fail", "", _first_line(err))
    result.figures.update(allreduce_busbw_gb_per_s=found["busbw_gb_per_s"],
                          allreduce_algbw_gb_per_s=found["algbw_gb_per_s"], allreduce_bytes=nbytes)
    return Row("NCCL allreduce", "ok", f"busbw {found['busbw_gb_per_s']:.1f} GB/s",
               f"algbw {found['algbw_gb_per_s']:.1f} GB/s, {nbytes / 1e6:.1f} MB (the gradients) across "
               f"{result.gpus} GPUs, {found['seconds'] * 1e3:.2f} ms (median of {len(found['times_s'])})")


def _verdict_row(result: DoctorResult) -> Row:
    """Loader cores each GPU needs at the measured step rate, against the cores per GPU here."""
    f = result.figures
    if not result.gpus:
        return Row("loader cores per GPU", "skipped", "", NO_CUDA)
    available = result.cores / result.gpus
    f["cores_per_gpu_available"] = available
    step, per_core = result.step_clips_per_s, f["loader_clips_per_s_per_core"]
    if step is None or not per_core:
        return Row("loader cores per GPU", "skipped", "", "no step rate or no loader rate measured")
    needed = step / per_core
    f["cores_per_gpu_needed"] = needed
    fits = needed <= available
    return Row("loader cores per GPU", "ok" if fits else "fail", f"{needed:.1f} needed, {available:.1f} here",
               f"{result.cores} cores for {result.gpus} GPUs; "
               + ("the loader keeps up with the step" if fits else
                  f"data-bound: the loader feeds about {per_core * available:.0f} of {step:.0f} clips/s per GPU"))


def verdict_line(result: DoctorResult) -> str:
    """The one-line verdict: loader cores per GPU needed at the step rate against those here,
    or why it could not be computed."""
    row = next((r for r in result.rows if r.check == "loader cores per GPU"), None)
    if row is None:
        return "verdict: no recipe: the environment only (give a recipe to measure its loader and step)"
    f = result.figures
    if row.status != "ok" and f["cores_per_gpu_needed"] is None:
        loader = f["loader_clips_per_s_per_core"]
        return (f"verdict: {row.detail}" + (f"; the loader gives {loader:.1f} clips/s per core" if loader else ""))
    return (f"verdict: the step needs {f['cores_per_gpu_needed']:.1f} loader cores per GPU; this process may use "
            f"{result.cores} cores for {result.gpus} GPUs = {f['cores_per_gpu_available']:.1f} per GPU: "
            + ("enough" if row.status == "ok" else "not enough, " + row.detail.split("; ", 1)[-1]))


if __name__ == "__main__":  # one rank of allreduce_bandwidth: RANK WORLD PORT BYTES ITERS BACKEND TIMEOUT_S
    allreduce_worker(*map(int, sys.argv[1:6]), sys.argv[6], float(sys.argv[7]))
