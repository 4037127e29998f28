#!/usr/bin/env bash
# The Python reference environment (.deps/py) that tools/ scripts use to generate test fixtures
# and that the interop tests load zerokit's output with: PyTorch 2.11.0 (CPU use here),
# transformers, safetensors, tiktoken, TensorBoard, DeepSpeed 0.19.8.
#
# It is lean on disk because CI machines can be short of it (one CI run died with ENOSPC here):
# no pip cache, no Triton (torch imports it only for torch.compile, which nothing here uses), and
# the torch wheel that setup fetched is deleted once installed. About 4.4 GB in all, 5 GB at the
# peak of the install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.deps/py"
stamp="$py/.zerokit-ok-4"
[ -f "$stamp" ] && exit 0

need_gb=6
mkdir -p "$root/.deps"
free_kb=$(df -Pk "$root/.deps" | awk 'NR == 2 { print $4 }')
if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  echo "pyenv: $root/.deps has $((free_kb / 1024)) MiB free; the Python reference environment" \
    "(PyTorch, transformers, DeepSpeed) needs about $need_gb GiB while installing" >&2
  exit 1
fi

rm -rf "$py"
python3 -m venv "$py"
pip=("$py/bin/pip" install -q --no-cache-dir)
"${pip[@]}" --upgrade pip
"${pip[@]}" --no-deps --find-links "$root/.deps/wheels" torch==2.11.0
# torch's own requirements, less Triton.
mapfile -t reqs < <("$py/bin/python" - <<'PY'
import importlib.metadata as m
for r in m.requires("torch"):
    if "extra ==" not in r and not r.startswith("triton"):
        print(r)
PY
)
"${pip[@]}" "${reqs[@]}" "transformers>=5,<6" safetensors "tiktoken==0.14.*" numpy
# TensorBoard's own event reader checks the event files train writes (tools/read_tfevents.py).
"${pip[@]}" "tensorboard>=2.20,<3"
# DeepSpeed for its fixtures and reference formulas; no CUDA ops are built (none are used).
DS_BUILD_OPS=0 "${pip[@]}" deepspeed==0.19.8
"$py/bin/python" -c "import torch, transformers, deepspeed" 2>/dev/null ||
  { echo "pyenv: the installed environment does not import torch, transformers and deepspeed" >&2; exit 1; }
# pip's resolver brings Triton back with the packages that require torch: take it out again.
"$py/bin/pip" uninstall -q -y triton
rm -f "$root"/.deps/wheels/torch-*.whl
touch "$stamp"
echo "pyenv: ready at $py"
