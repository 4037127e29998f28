#!/usr/bin/env bash
# The Python reference environment (.deps/py) that tools/ scripts use to generate test fixtures
# and run peer benchmarks: PyTorch 2.11.0 (CPU use here), transformers, safetensors, tiktoken,
# TensorBoard, DeepSpeed 0.19.8. Not needed to build or test zerokit: fixtures are committed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.deps/py"
stamp="$py/.zerokit-ok-3"
[ -f "$stamp" ] && exit 0
python3 -m venv "$py"
"$py/bin/pip" install -q --upgrade pip
"$py/bin/pip" install -q --find-links "$root/.deps/wheels" torch==2.11.0 "transformers>=5,<6" safetensors "tiktoken==0.14.*" numpy
# TensorBoard's own event reader checks the event files train writes (tools/read_tfevents.py).
"$py/bin/pip" install -q "tensorboard>=2.20,<3"
# DeepSpeed for its fixtures and reference formulas; no CUDA ops are built (none are used).
DS_BUILD_OPS=0 "$py/bin/pip" install -q deepspeed==0.19.8
touch "$stamp"
echo "pyenv: ready at $py"
