#!/usr/bin/env bash
# Install everything the project needs into ./.venv, from nothing, idempotently.
#
#   1. system packages (Open MPI for Horovod's MPI controller and Adasum,
#      FFmpeg for the demo's video generation) when running as root;
#   2. ./.venv with the pinned requirements;
#   3. Horovod 0.28.1 built from its source distribution with the C++ standard
#      raised to C++20 (its CMakeLists say 14; torch 2.14's headers need 20),
#      with PyTorch, MPI and Gloo, and, when the CUDA toolkit is there (nvcc,
#      a CUDA build of torch and the NCCL that torch's wheels ship in
#      site-packages/nvidia/nccl), with NCCL for GPU tensors
#      (HOROVOD_GPU_OPERATIONS=NCCL; CPU tensors still go through MPI/Gloo).
#      The wheel is cached outside the repository ($TCA_WHEEL_CACHE, default
#      ~/.cache/tca-wheels/<torch>-<python>[-nccl]/) so a re-install takes
#      seconds;
#   4. a check that `horovodrun --check-build` lists PyTorch, MPI and Gloo
#      (and NCCL when it was built with it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
HOROVOD_VERSION=0.28.1
WHEEL_CACHE="${TCA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tca-wheels}"
PYTHON="${PYTHON:-python3}"

say() { echo "[install] $*"; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. system
need_pkgs=()
command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1 || need_pkgs+=(libopenmpi-dev openmpi-bin)
command -v ffmpeg >/dev/null 2>&1 || need_pkgs+=(ffmpeg)
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null \
            || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null; } \
            || die "could not apt-get install ${need_pkgs[*]}"
    else
        die "missing system packages: ${need_pkgs[*]} (install them, e.g. 'sudo apt-get install ${need_pkgs[*]}', and re-run)"
    fi
fi

# ---------------------------------------------------------------- 2. venv
if [ ! -x "$PY" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
req_hash="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$req_hash" ]; then
    say "installing requirements.txt (first time: torch is a large install, a few minutes)"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$PY" -c "import torch, torchvision, h5py, av, sklearn, pandas, tqdm" \
        || die "requirements did not install (see the pip output above)"
    echo "$req_hash" > "$stamp"
else
    say "requirements already installed"
fi

# ---------------------------------------------------------------- 3. horovod
# NCCL for GPU tensors whenever the CUDA toolkit is there: nvcc (under
# $CUDA_HOME, default /usr/local/cuda, or on PATH), a CUDA build of torch, and
# the NCCL headers and library that torch's wheels install (nvidia/nccl).
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
nccl_dir=""
if [ -x "$cuda_home/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1; then
    nccl_dir="$("$PY" - <<'PY' 2>/dev/null || true
import os, torch
if torch.version.cuda:
    import nvidia.nccl
    d = list(nvidia.nccl.__path__)[0]
    if os.path.isfile(os.path.join(d, "include", "nccl.h")) and os.path.isfile(os.path.join(d, "lib", "libnccl.so.2")):
        print(d)
PY
)"
fi

horovod_ok() {
    WANT_NCCL="${nccl_dir:+1}" "$PY" - <<'PY' 2>/dev/null
import os
import horovod, horovod.torch as hvd
assert horovod.__version__ == "0.28.1"
assert hvd.mpi_built() and hvd.gloo_built()
assert hvd.nccl_built() or not os.environ.get("WANT_NCCL")
PY
}

if horovod_ok; then
    say "horovod $HOROVOD_VERSION already installed"
else
    # A wheel is tied to the torch and Python it was compiled against.
    tag="$("$PY" -c 'import sys, torch; print("torch%s-py%d%d" % (torch.__version__.replace("+", "_"), *sys.version_info[:2]))')"
    [ -n "$nccl_dir" ] && tag="$tag-nccl"
    cache_dir="$WHEEL_CACHE/$tag"
    wheel="$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$wheel" ]; then
        say "building horovod $HOROVOD_VERSION from source (about 10 minutes on 2 cores, 12-20 with NCCL)"
        build_dir="$(mktemp -d)"
        trap 'rm -rf "$build_dir"' EXIT
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build_dir" 2>&1 \
            | grep -v "is ignored: it is neither a file nor a directory" || true
        tar -xzf "$build_dir/horovod-$HOROVOD_VERSION.tar.gz" -C "$build_dir" \
            || die "could not download the horovod $HOROVOD_VERSION source distribution from PyPI"
        src="$build_dir/horovod-$HOROVOD_VERSION"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q "CMAKE_CXX_STANDARD 20" "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
            || die "could not patch the C++ standard in horovod's CMakeLists.txt"
        mkdir -p "$cache_dir"
        log="$build_dir/build.log"
        nccl_env=()
        if [ -n "$nccl_dir" ]; then
            # torch's NCCL wheel ships libnccl.so.2 but no libnccl.so, the only
            # shared name Horovod's FindNCCL looks for: let it find
            # libnccl.so.2 first (CMake then also puts its directory in the
            # extension's rpath).
            sed -i 's/set(NCCL_LIBNAME "nccl")/set(NCCL_LIBNAME "libnccl.so.2" "nccl")/' \
                "$src/cmake/Modules/FindNCCL.cmake"
            grep -q 'NCCL_LIBNAME "libnccl.so.2"' "$src/cmake/Modules/FindNCCL.cmake" \
                || die "could not patch the NCCL library name in horovod's FindNCCL.cmake"
            nccl_env=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
                      HOROVOD_NCCL_INCLUDE="$nccl_dir/include" HOROVOD_NCCL_LIB="$nccl_dir/lib")
            say "with NCCL for GPU tensors ($nccl_dir)"
        fi
        if ! env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
                HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 "${nccl_env[@]}" \
                CUDA_HOME="$cuda_home" CUDAToolkit_ROOT="$cuda_home" PATH="$cuda_home/bin:$PATH" \
                MAKEFLAGS="-j$(nproc)" \
                "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$cache_dir" "$src" >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            cp "$log" "$WHEEL_CACHE/horovod-build-failed.log" 2>/dev/null || true
            die "horovod build failed (last lines above; full log: $WHEEL_CACHE/horovod-build-failed.log)"
        fi
        wheel="$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1)"
        say "cached $wheel"
    else
        say "installing cached $wheel"
    fi
    "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
fi

# ---------------------------------------------------------------- 4. check
expected=(PyTorch MPI Gloo)
[ -n "$nccl_dir" ] && expected+=(NCCL)
check="$("$VENV/bin/horovodrun" --check-build 2>&1 || true)"
missing=()
for item in "${expected[@]}"; do
    grep -Eq "\[X\] $item" <<<"$check" || missing+=("$item")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "$check" >&2
    die "horovodrun --check-build does not list: ${missing[*]}"
fi
say "horovodrun --check-build lists ${expected[*]}"
say "done: activate with 'source .venv/bin/activate'"
