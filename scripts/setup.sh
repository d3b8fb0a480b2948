#!/usr/bin/env bash
# Installs everything tsmtrain needs on a fresh Debian machine (Python 3.11):
#   * Debian packages: ffmpeg (video encode/decode), OpenMPI (mpirun + headers for mpi4py/Horovod),
#     g++ and ninja (the Horovod build, and the native temporal-shift operator)
#   * a virtual environment in .venv with torch, torchvision, decoders and the CLI libraries, and
#     where an NVIDIA driver is present PyNvVideoCodec (GPU decoding with NVDEC, from PyPI)
#   * Horovod 0.28.1 built from its PyPI sdist with the C++20 fix; the built wheel is cached in
#     $TSMTRAIN_WHEEL_CACHE (default ~/.cache/tsmtrain/wheels) so a second set-up skips the build.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
WHEELS=${TSMTRAIN_WHEEL_CACHE:-$HOME/.cache/tsmtrain/wheels}
HOROVOD_VERSION=0.28.1
APT_PACKAGES=(ffmpeg openmpi-bin libopenmpi-dev g++ ninja-build)

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
VENV=$(cd "$VENV" && pwd)
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel packaging
log "installing torch, torchvision and requirements"
"${PIP[@]}" install -r requirements.txt

# 2b. GPU video decoding from PyPI: PyNvVideoCodec (NVIDIA's NVDEC API; data.decoder:
#     pynvvideocodec) needs only the NVIDIA driver, so it is installed where one is present
#     (/proc/driver/nvidia/version, or nvidia-smi). TSMTRAIN_GPU_DECODER=none skips it,
#     =pynvvideocodec installs it anyway (a login node without GPUs building a shared venv).
#     torchcodec from PyPI is CPU-only; its CUDA build comes from the PyTorch index
#     (docs/installing.md). `tsmtrain env` says which decoders work on the GPU.
gpu_decoder=${TSMTRAIN_GPU_DECODER:-auto}
if [ "$gpu_decoder" = auto ]; then
    gpu_decoder=none
    if [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; then gpu_decoder=pynvvideocodec; fi
fi
case "$gpu_decoder" in
    pynvvideocodec) log "installing pynvvideocodec (GPU decoding with NVDEC)"; "${PIP[@]}" install "pynvvideocodec>=2.2" ;;
    none) log "no NVIDIA driver here: GPU video decoding (pynvvideocodec) not installed" ;;
    *) log "TSMTRAIN_GPU_DECODER=$gpu_decoder: use auto, pynvvideocodec or none"; exit 1 ;;
esac

# 3. Horovod 0.28.1 from its sdist: it asks for C++14 but torch 2.x headers need C++20.
#    With nvcc (CUDA_HOME, default /usr/local/cuda, or on PATH) it is built with
#    HOROVOD_GPU_OPERATIONS=NCCL against the NCCL wheel torch ships (nvidia-nccl-cu13), for the
#    CUDA architectures that both torch and this nvcc support (TSMTRAIN_CUDA_ARCHS=75,80,...
#    overrides); Gloo and MPI stay on. TSMTRAIN_HOROVOD_GPU=none forces the CPU-only build.
#    The wheel is cached in a folder named after the build (cpu-..., nccl-...), so a CPU-only
#    wheel is never reused where an NCCL one is wanted.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=""
if [ "${TSMTRAIN_HOROVOD_GPU:-auto}" != none ]; then
    for c in "$CUDA_HOME/bin/nvcc" "$(command -v nvcc || true)"; do
        if [ -n "$c" ] && [ -x "$c" ]; then NVCC=$c; break; fi
    done
fi
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
NCCL_DIR=""
if [ -n "$NVCC" ]; then
    # CUDA_HOME is the toolkit that nvcc belongs to (a wrapper script on PATH counts too).
    cuda_version=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
    [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
    NCCL_DIR=$("$VENV/bin/python" -c "import nvidia.nccl as n; print(list(n.__path__)[0])" 2>/dev/null || true)
    if [ -z "$NCCL_DIR" ] || [ ! -f "$NCCL_DIR/include/nccl.h" ] || [ ! -f "$NCCL_DIR/lib/libnccl.so.2" ]; then
        log "nvcc $cuda_version found but torch's NCCL wheel (nvidia/nccl/include/nccl.h, lib/libnccl.so.2) is missing: building Horovod without NCCL"
        NVCC=""
    fi
fi
if [ -n "$NVCC" ]; then
    # Architectures: those torch's own CUDA kernels are built for (a GPU outside them cannot run
    # torch anyway) that this nvcc can target; CUDA 13 has dropped everything before Turing (75).
    torch_archs=$("$VENV/bin/python" -c "import torch; print(' '.join(a.split('_')[1] for a in torch._C._cuda_getArchFlags().split()) if torch.version.cuda else '')")
    user_archs=${TSMTRAIN_CUDA_ARCHS:-}
    nvcc_archs=" $("$NVCC" --list-gpu-code | sed -n 's/^sm_//p' | tr '\n' ' ') "
    archs=""
    for a in ${user_archs//,/ }; do
        [[ "$nvcc_archs" == *" $a "* ]] || { log "TSMTRAIN_CUDA_ARCHS: nvcc $cuda_version cannot build sm_$a (it knows:$nvcc_archs)"; exit 1; }
        archs="$archs,$a"
    done
    if [ -z "$user_archs" ]; then
        for a in $torch_archs; do [[ "$nvcc_archs" == *" $a "* ]] && archs="$archs,$a"; done
    fi
    archs=${archs#,}
    if [ -z "$archs" ]; then
        log "torch $torch_version has no CUDA architecture that nvcc $cuda_version can build (${torch_archs:-a CPU-only torch}): building Horovod without NCCL"
        NVCC=""
    fi
fi
if [ -n "$NVCC" ]; then
    flavour="nccl-cuda$cuda_version-sm${archs//,/.}-torch$torch_version"
    want_nccl=1
    log "Horovod build: NCCL (torch's $(basename "$(dirname "$NCCL_DIR")")/nccl), CUDA $cuda_version at $CUDA_HOME, architectures sm_${archs//,/ sm_}, plus Gloo and MPI"
else
    flavour="cpu-torch$torch_version"
    want_nccl=0
    [ "${TSMTRAIN_HOROVOD_GPU:-auto}" = none ] && why="TSMTRAIN_HOROVOD_GPU=none" || why="no nvcc in $CUDA_HOME/bin or on PATH"
    log "Horovod build: CPU only (Gloo and MPI, no NCCL): $why"
fi
if ! "$VENV/bin/python" -c "import sys, horovod.torch as h; sys.exit(0 if bool(h.nccl_built()) >= bool($want_nccl) else 1)" 2>/dev/null; then
    cache="$WHEELS/horovod-$HOROVOD_VERSION/$flavour"
    mkdir -p "$cache"
    whl=$(ls "$cache"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        log "building Horovod $HOROVOD_VERSION ($flavour) from its sdist (5 to 10 minutes on 2 cores)"
        build=$(mktemp -d); t0=$SECONDS
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
            export CUDA_HOME CUDAToolkit_ROOT=$CUDA_HOME HOROVOD_CUDA_HOME=$CUDA_HOME
            if [ "$want_nccl" = 1 ]; then
                # The wheel has lib/libnccl.so.2 but no libnccl.so for the linker: give it one in a
                # private folder, leaving the installed wheel as it is. At run time libnccl.so.2
                # is the one torch has already loaded (horovod.torch imports torch first).
                mkdir -p "$build/nccl-lib"
                ln -s "$NCCL_DIR/lib/libnccl.so.2" "$build/nccl-lib/libnccl.so"
                export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
                export HOROVOD_NCCL_HOME=$NCCL_DIR HOROVOD_NCCL_INCLUDE=$NCCL_DIR/include HOROVOD_NCCL_LIB=$build/nccl-lib
                export HOROVOD_BUILD_CUDA_CC_LIST=$archs CUDAARCHS=${archs//,/;}
            fi
            export MAKEFLAGS="-j$(nproc)"
            "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$cache" . \
                > "$build/build.log" 2>&1 || { tail -n 60 "$build/build.log"
                    [ "$want_nccl" = 1 ] && log "the NCCL build failed; TSMTRAIN_HOROVOD_GPU=none builds Horovod without NCCL"
                    exit 1; }
        )
        whl=$(ls "$cache"/horovod-$HOROVOD_VERSION-*.whl | head -n1)
        rm -rf "$build"
        log "built $whl in $((SECONDS - t0)) s"
    else
        log "using cached wheel $whl"
    fi
    "${PIP[@]}" install --force-reinstall --no-deps "$whl"
fi
if [ "$want_nccl" = 1 ]; then
    "$VENV/bin/python" -c "import horovod.torch as h; assert h.nccl_built(), 'Horovod was built without NCCL'"
fi

# 4. tsmtrain itself, editable.
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import horovod.torch, torch, decord, torchcodec; print('[setup] ok: torch', torch.__version__)"

# 5. The native CPU temporal shift (tsmtrain/models/csrc), built now so that the first run does
#    not wait for it; torch caches it in ~/.cache/torch_extensions and rebuilds when it changes.
"$VENV/bin/python" -c "from tsmtrain.models.shift import native_shift as n; print('[setup] native temporal shift:', 'built' if n() else 'not built, the PyTorch shift is used')"
