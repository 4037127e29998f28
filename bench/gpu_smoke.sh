#!/usr/bin/env bash
# First thing on a GPU machine: the CPU-linked binary loads libtorch_cuda and trains a tiny GPT-2
# in fp32, bf16 and fp16 (loss scaling), then samples from the checkpoint.
set -uo pipefail
source bench/gpu_env.sh
nvidia-smi -L
work=$(mktemp -d)
python3 - "$work/data" <<'PY'
import sys, os, numpy as np
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 200_000), ("val", 20_000)):
    (rng.integers(0, 500, n, dtype=np.uint16)).tofile(f"{d}/{split}.bin")
PY
for dtype in fp32 bf16 fp16; do
  echo "== tiny GPT-2 on cuda, $dtype"
  .carry/bin/train --set dataset="$work/data" --set out_dir="$work/$dtype" --set device=cuda --set dtype=$dtype \
    --set n_layer=2 --set n_head=4 --set n_embd=128 --set block_size=64 --set batch_size=8 --set max_iters=60 \
    --set eval_interval=30 --set eval_iters=4 --set log_interval=20 --set sample_tokens=16 2>&1 | grep -vE '^[a-z_0-9]+ = |^\[|^$|^"""' | tail -12
  echo "exit $?"
done
.carry/bin/train sample "$work/bf16" --tokens 8 --device cuda | tail -2
rm -rf "$work"
