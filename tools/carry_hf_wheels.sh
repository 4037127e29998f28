#!/usr/bin/env bash
# The wheels transformers needs to import on the GPU machines (their Python 3.12 venv has torch,
# numpy, filelock, fsspec, jinja2, sympy, networkx and typing-extensions, not transformers), for
# bench/gpu_llama.sh and bench/gpu_offload.sh: bench/gpu_env.sh's install_hf installs them with
# `pip install --no-index --no-deps --target /tmp/site-hf` when `import transformers` fails.
# The versions are those of the reference environment (tools/pyenv.sh), where the peers are tested;
# the list is what `from transformers import LlamaForCausalLM` needs with only torch's packages
# present (checked on 2026-12-03 with python -S and a bare site folder). Plus two for DeepSpeed's
# cpu_adam JIT build (bench/gpu_offload.sh): ninja's binary, in case the machine's is missing, and
# py-cpuinfo, which DeepSpeed reads the CPU's SIMD width from (else it falls back to lscpu).
#   bash tools/carry_hf_wheels.sh [DEST (.carry/whl-hf)] [PYTHON_VERSION (3.12)]
set -euo pipefail
DEST=${1:-.carry/whl-hf}
PYVER=${2:-3.12}
PY=${PY:-.deps/py/bin/python}
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
  regex==2026.11.19 pyyaml==6.0.4 tqdm==4.70.1 packaging==26.4 \
  httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 idna==3.20 h11==0.16.0 certifi==2026.10.19.post1 \
  truststore==0.10.5 ninja==1.13.0 py-cpuinfo==9.0.0
du -sh "$DEST"
