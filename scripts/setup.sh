#!/usr/bin/env bash
# Installs everything tsmtrain needs on a fresh Debian machine (Python 3.11):
#   * Debian packages: ffmpeg (video encode/decode), OpenMPI (mpirun + headers for mpi4py/Horovod)
#   * a virtual environment in .venv with torch, torchvision, decoders and the CLI libraries
#   * Horovod 0.28.1 built from its PyPI sdist with the C++20 fix; the built wheel is cached in
#     $TSMTRAIN_WHEEL_CACHE (default ~/.cache/tsmtrain/wheels) so a second set-up skips the build.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
WHEELS=${TSMTRAIN_WHEEL_CACHE:-$HOME/.cache/tsmtrain/wheels}
HOROVOD_VERSION=0.28.1
APT_PACKAGES=(ffmpeg openmpi-bin libopenmpi-dev)

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages.
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    log "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Virtual environment and Python packages.
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; $PY -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel packaging
log "installing torch, torchvision and requirements"
"${PIP[@]}" install -r requirements.txt

# 3. Horovod 0.28.1: its sdist asks for C++14 but torch 2.x headers need C++20.
if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
    mkdir -p "$WHEELS"
    whl=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        log "building Horovod $HOROVOD_VERSION from its sdist (about 5 minutes on 2 cores)"
        build=$(mktemp -d)
        "${PIP[@]}" download --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
        tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt"
        # pip's CMake 4 rejects Horovod's old cmake_minimum_required: use the system CMake.
        "${PIP[@]}" uninstall -y cmake >/dev/null 2>&1 || true
        (
            cd "$src"
            export PATH="/usr/bin:$PATH"
            export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
            export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
            export CUDA_HOME=/usr/local/cuda CUDAToolkit_ROOT=/usr/local/cuda HOROVOD_CUDA_HOME=/usr/local/cuda
            export MAKEFLAGS="-j$(nproc)"
            "$OLDPWD/$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$WHEELS" . \
                > "$build/build.log" 2>&1 || { tail -n 60 "$build/build.log"; exit 1; }
        )
        whl=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl | head -n1)
        rm -rf "$build"
    else
        log "using cached wheel $whl"
    fi
    "${PIP[@]}" install "$whl"
fi

# 4. tsmtrain itself, editable.
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import horovod.torch, torch, decord, torchcodec; print('[setup] ok: torch', torch.__version__)"
