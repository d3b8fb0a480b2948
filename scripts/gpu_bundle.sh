#!/usr/bin/env bash
# Fills DIR (default .gpu-bundle/, ignored by git) with what a bare GPU machine lacks for
# scripts/gpu_check.sh: a machine with an NVIDIA GPU, a system Python with PyTorch, no package
# registry and no ffmpeg. Run it HERE (with make setup done: .venv, ffmpeg, ../shared/clips), then
# carry DIR along with the checkout and run `bash scripts/gpu_check.sh OUTDIR` there.
#
#   DIR/wheels/             wheels for CPython $GPU_PYTHON (default 3.12) on manylinux x86-64 of
#                           what tsmtrain imports at run time and a bare torch install may lack
#                           (pydantic and its parts, typer, rich, pyyaml, jinja2, psutil, ...),
#                           pynvvideocodec (NVDEC) and, when the budget allows, torchvision 0.26.0
#                           (the one built for torch 2.11). gpu_check.sh installs only those the
#                           machine lacks, with pip --no-index --no-deps --target.
#   DIR/data/demo/          the demo dataset (configs/demo.yaml, data.generate: demo), rendered
#                           here by the project's own code (tsmtrain.train.runtime.prepare_dataset)
#   DIR/data/shared_clips/  ../shared/clips prepared by `tsmtrain prepare configs/shared_clips.yaml`
#                           (H.264 yuv420p, constant frame rate, short side 256, GOP 16)
#   DIR/reference/frames.npz  frames of a few prepared clips at fixed indices, decoded here by
#                           torchcodec on the CPU at the stored size (the NVDEC tolerance check)
#   DIR/bundle.json         what is in DIR, with sizes, and what made it
#
# Only one Python version: pynvvideocodec is a 27 MB wheel per CPython version, so wheels for both
# 3.11 and 3.12 do not fit the 60 MiB budget. 3.12 is the GPU machine's (Python 3.12.3 with torch
# 2.11.0, as seen there); GPU_PYTHON=3.11 builds a 3.11 bundle instead.
#
# Idempotent: the demo data and the prepared clips are skipped when already there (their own
# markers), wheels already downloaded are kept. Fails when DIR holds more than 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.gpu-bundle}
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-60}
PYNVVIDEOCODEC_VERSION=${PYNVVIDEOCODEC_VERSION:-2.2.4}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.26.0}   # built for torch 2.11 (the GPU machine's)
TORCHVISION_MAX_MIB=${TORCHVISION_MAX_MIB:-56}       # added only when the bundle stays under this with it

log() { printf '[gpu-bundle] %s\n' "$*"; }
die() { printf '[gpu-bundle] error: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "$PY not found: run make setup first (or set PYTHON)"
command -v ffmpeg >/dev/null || die "ffmpeg not found: the demo clips and the prepared clips are encoded with it (make setup)"
[ -d ../shared/clips ] || die "../shared/clips not found: the real clips are prepared from there"
tag=cp${GPU_PYTHON/./}
mkdir -p "$DIR/wheels" "$DIR/data" "$DIR/reference"
DIR=$(cd "$DIR" && pwd)
t0=$SECONDS

# 1. Wheels. Pinned to the versions installed in the venv here (what the test suite ran with),
#    except pynvvideocodec (not installed here: no NVIDIA driver) and torchvision (the GPU
#    machine's torch is 2.11, not 2.14). pydantic-core, pyyaml, markupsafe and pynvvideocodec are
#    compiled (one CPython version); the rest are pure Python. Not bundled: torch and numpy (the
#    machine's), tensorboard and matplotlib (the check runs with train.tensorboard=false and
#    imports neither), torchcodec and decord (the GPU machine has no FFmpeg; NVDEC decodes there).
PURE=(pydantic annotated-types typing-inspection typing-extensions typer annotated-doc shellingham
      rich pygments markdown-it-py mdurl jinja2 psutil packaging)
COMPILED=(pydantic-core pyyaml markupsafe)
pins=$("$PY" - "${PURE[@]}" "${COMPILED[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed in this venv (make setup)")
print(" ".join(out))
EOF
)
log "wheels for CPython $GPU_PYTHON ($tag, manylinux x86-64) only: pynvvideocodec alone is 27 MB per Python version"
PLATFORMS=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
download() {
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
        --python-version "$GPU_PYTHON" --implementation cp --abi "$tag" --abi abi3 --abi none \
        "${PLATFORMS[@]}" --platform any -d "$DIR/wheels" "$@" 2>&1 | grep -v "is ignored: it is neither" || true
}
# shellcheck disable=SC2086
download $pins "pynvvideocodec==$PYNVVIDEOCODEC_VERSION"
wanted=$(printf '%s\n' $pins "pynvvideocodec==$PYNVVIDEOCODEC_VERSION")

# 2. The demo dataset, rendered by the project's own code (as tsmtrain run does on first use).
log "demo dataset -> $DIR/data/demo"
"$PY" scripts/gpu_check.py bundle-demo "$DIR"

# 3. ../shared/clips prepared for fast (and NVDEC) decoding: constant frame rate H.264.
log "tsmtrain prepare configs/shared_clips.yaml -> $DIR/data/shared_clips"
# GOP 16, not prepare's default 4: the smaller files keep the bundle under its 60 MiB (GOP 4 would
# add about 5 MiB), and the GPU check decodes them the same way.
"$PY" -m tsmtrain prepare configs/shared_clips.yaml --out "$DIR/data/shared_clips" --jobs "$(nproc)" --gop 16

# 4. CPU reference frames of a few prepared clips (torchcodec, stored size).
log "CPU reference frames -> $DIR/reference/frames.npz"
"$PY" scripts/gpu_check.py bundle-reference "$DIR"

# 5. torchvision, a fallback for a machine whose own torchvision does not import (gpu_check.sh
#    uses the machine's when it imports): only when the bundle stays under TORCHVISION_MAX_MIB.
size_mib() { du -sb "$DIR" | awk '{printf "%.1f", $1 / 1048576}'; }
have_tv() { ls "$DIR"/wheels/torchvision-"$TORCHVISION_VERSION"-*.whl >/dev/null 2>&1; }
if ! have_tv; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
        --python-version "$GPU_PYTHON" --implementation cp --abi "$tag" "${PLATFORMS[@]}" -d "$tmp" \
        "torchvision==$TORCHVISION_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
    tv=$(ls "$tmp"/torchvision-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$tv" ]; then
        log "torchvision $TORCHVISION_VERSION for $tag: no wheel found, not bundled"
    else
        with=$(( $(du -sb "$DIR" | cut -f1) + $(stat -c %s "$tv") ))
        if [ "$with" -le $((TORCHVISION_MAX_MIB * 1048576)) ]; then
            mv "$tv" "$DIR/wheels/"
            log "torchvision $TORCHVISION_VERSION bundled ($(( $(stat -c %s "$DIR/wheels/$(basename "$tv")") / 1048576 )) MiB; used only where the machine's own does not import)"
        else
            log "torchvision $TORCHVISION_VERSION not bundled: the bundle would hold $((with / 1048576)) MiB (over $TORCHVISION_MAX_MIB)"
        fi
    fi
    rm -rf "$tmp"
fi
if have_tv; then wanted=$(printf '%s\n' $wanted "torchvision==$TORCHVISION_VERSION"); fi

# Only one version of each wheel: remove any left from an earlier bundle with other pins or for
# another Python.
"$PY" - "$DIR/wheels" "$tag" $wanted <<'EOF'
import re, sys
from pathlib import Path
folder, tag, wanted = Path(sys.argv[1]), sys.argv[2], {}
for pin in sys.argv[3:]:
    name, _, ver = pin.partition("==")
    wanted[re.sub(r"[-_.]+", "_", name).lower()] = ver
for whl in folder.glob("*.whl"):
    name, ver, py, abi = whl.name[:-4].split("-")[:4]
    other_python = py.startswith("cp") and abi != "abi3" and tag not in py.split(".")
    if wanted.get(re.sub(r"[-_.]+", "_", name).lower()) != ver or other_python:
        print(f"[gpu-bundle] removing {whl.name} ({'for another Python' if other_python else 'not pinned now'})")
        whl.unlink()
missing = sorted(set(wanted) - {re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in folder.glob("*.whl")})
if missing:
    sys.exit(f"[gpu-bundle] error: no wheel downloaded for {', '.join(missing)}")
EOF

# 6. The manifest, then the size check.
"$PY" scripts/gpu_check.py bundle-manifest "$DIR" --python "$GPU_PYTHON" --limit-mib "$LIMIT_MIB"
total=$(du -sb "$DIR" | cut -f1)
log "$(printf '%-28s %8s' 'part' 'MiB')"
for part in wheels data/demo data/shared_clips reference; do
    log "$(printf '%-28s %8.1f' "$part" "$(du -sb "$DIR/$part" | awk '{print $1 / 1048576}')")"
done
log "$(printf '%-28s %8.1f' "total ($DIR)" "$(awk -v b="$total" 'BEGIN {print b / 1048576}')")"
log "done in $((SECONDS - t0)) s"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    die "the bundle holds $(size_mib) MiB, over the $LIMIT_MIB MiB budget (the checkout and the bundle travel together, 64 MiB in all)"
fi
log "carry $(basename "$DIR") with the checkout, then on the GPU machine: bash scripts/gpu_check.sh OUTDIR"
