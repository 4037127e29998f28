#!/usr/bin/env bash
# DeepSpeed 0.19.8 for the GPU machines (../shared/GPU.md): its sdist and the wheels of what it
# imports that their Python 3.12 venv lacks, into .carry/whl; bench/gpu_env.sh's install_deepspeed
# builds and installs them there without network.
#   bash tools/carry_deepspeed_wheels.sh [DEST (.carry/whl)] [PYTHON_VERSION (3.12)]
set -euo pipefail
DEST=${1:-.carry/whl}
PYVER=${2:-3.12}
PY=${PY:-.deps/py/bin/python}
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions msgpack py-cpuinfo einops
du -sh "$DEST"
