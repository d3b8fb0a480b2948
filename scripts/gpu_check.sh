#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with an NVIDIA GPU and a system Python with PyTorch,
# without a package registry or ffmpeg. From the repository root:
#
#   bash scripts/gpu_bundle.sh                   # here, once: fills .gpu-bundle/ (wheels, data)
#   bash scripts/gpu_check.sh OUTDIR             # there, with .gpu-bundle carried along
#   bash scripts/gpu_check.sh OUTDIR --cpu-only  # here: the same stages on the CPU
#
# Options: --bundle DIR (default $GPU_CHECK_BUNDLE, else .gpu-bundle), --cpu-only, --work DIR
# (scratch: the installed wheels, the recipe, the run directory; default a new folder under
# $TMPDIR). PYTHON=... picks the interpreter; otherwise the first of python3,
# /opt/torch/.venv/bin/python3, python and .venv's (.venv's first with --cpu-only) that imports
# torch, one that sees a GPU preferred.
#
# Stages (scripts/gpu_check.py, each under `timeout`, about 8 minutes in all): install the bundled
# wheels this Python lacks (pip --no-index --no-deps --target), env.json, tsmtrain doctor
# (doctor.json), the demo as one DDP rank over NCCL with bf16, channels_last and NVDEC decoding
# (demo.json), NVDEC clips/s and the tolerance against CPU frames (nvdec.json); then summary.json
# and a table. A failing stage is recorded and the next one runs; the exit status is 1 when any
# stage failed. Every stage's output is in OUTDIR/logs/check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR [--cpu-only] [--bundle DIR] [--work DIR]" >&2; exit 2; }
OUTDIR="" CPU_ONLY=0 ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-only) CPU_ONLY=1; ARGS+=(--cpu-only) ;;
        --bundle|--work) [ $# -ge 2 ] || usage; ARGS+=("$1" "$2"); shift ;;
        --bundle=*|--work=*) ARGS+=("$1") ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [ -z "$OUTDIR" ] || usage; OUTDIR=$1 ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || usage

if [ "$CPU_ONLY" = 1 ]; then
    candidates=("${PYTHON:-}" .venv/bin/python python3 python)
else
    candidates=("${PYTHON:-}" python3 /opt/torch/.venv/bin/python3 python .venv/bin/python)
fi
PY="" FALLBACK=""
for c in "${candidates[@]}"; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if [ "$CPU_ONLY" = 1 ] || [ -n "${PYTHON:-}" ]; then
        "$c" -c "import torch" >/dev/null 2>&1 && { PY=$c; break; }
        continue
    fi
    ok=$("$c" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) || continue
    [ -n "$FALLBACK" ] || FALLBACK=$c
    [ "$ok" = 1 ] && { PY=$c; break; }
done
PY=${PY:-$FALLBACK}
if [ -z "$PY" ]; then
    echo "[gpu-check] error: no Python with torch found (tried: ${candidates[*]}); set PYTHON=..." >&2
    mkdir -p "$OUTDIR"
    printf '{"status": "failed", "error": "no Python with torch found", "exit_status": 1}\n' > "$OUTDIR/summary.json"
    exit 1
fi
PY=$(command -v "$PY")
exec "$PY" scripts/gpu_check.py check "$OUTDIR" "${ARGS[@]}"
