#!/usr/bin/env bash
# Installs what building zerokit needs, from PyPI only, into .deps/ (idempotent, quick when done):
#   .deps/site      the torch==2.11.0 wheel's C++ libraries and headers, plus libcudart/libcupti
#                   (libtorch_cpu.so needs them even on CPU)
#   .deps/libtorch  LIBTORCH for tch 0.24: include/ and lib/ with the CUDA libraries left out, so
#                   binaries link only libtorch_cpu + libc10 and run here; on a GPU machine
#                   zerokit dlopens libtorch_cuda.so at start-up (lib/device.rs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
stamp="$deps/libtorch/.zerokit-2.11.0"
[ -f "$stamp" ] && exit 0

echo "setup: installing libtorch 2.11.0 from PyPI's torch wheel into $deps (one time)"
rm -rf "$deps/site" "$deps/libtorch" "$deps/wheels"
mkdir -p "$deps/wheels" "$deps/site"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$deps/wheels" \
  torch==2.11.0 "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
for w in "$deps"/wheels/*.whl; do python3 -m zipfile -e "$w" "$deps/site.tmp"; done
# Keep only what linking and running need: torch's C++ side and the two CUDA runtime libraries.
mkdir -p "$deps/site/torch" "$deps/site/nvidia/cu13"
mv "$deps/site.tmp/torch/lib" "$deps/site.tmp/torch/include" "$deps/site/torch/"
mv "$deps/site.tmp/nvidia/cu13/lib" "$deps/site/nvidia/cu13/"
# The torch wheel stays in .deps/wheels: tools/pyenv.sh installs the same wheel without fetching it again.
rm -rf "$deps/site.tmp"
find "$deps/wheels" -name '*.whl' ! -name 'torch-*' -delete

mkdir -p "$deps/libtorch/lib"
ln -s ../site/torch/include "$deps/libtorch/include"
for f in "$deps"/site/torch/lib/*; do
  case "$(basename "$f")" in
    libtorch_cuda*|libc10_cuda.so|libtorch_nvshmem.so|libcaffe2_nvrtc.so|libtorch_python.so) ;;
    *) ln -s "../../site/torch/lib/$(basename "$f")" "$deps/libtorch/lib/" ;;
  esac
done
# libtorch_cpu.so finds libcudart through its RPATH $ORIGIN/../../nvidia/cu13/lib, and $ORIGIN is
# the symlink's folder (.deps/libtorch/lib): make that path resolve.
ln -s site/nvidia "$deps/nvidia"
echo "2.11.0" > "$deps/libtorch/build-version"
touch "$stamp"
echo "setup: done"
