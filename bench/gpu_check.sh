#!/usr/bin/env bash
# One call on a GPU machine for a change to the engine or the model (issue 12): the tests that
# need a GPU (ignored on CPU machines: fused AdamW against PyTorch's, the fp16/bf16 overflow
# check, GPT-2 on CUDA against the CPU reference), the tiny smoke run, and the step time of this
# build against the build before it, side by side in the same call (bench/gpu_single.sh with
# ZK_BINS). From the repo root, with .carry/bin/train, .carry/bin/$BEFORE and the test binaries
# in .carry/tests (strip -o .carry/tests/NAME target/release/deps/NAME-HASH):
#   BEFORE=train-a04011c COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
# RUNS (default "gpt2-xl:fp16:8 gpt2:bf16:16") and PEERS (default zerokit) go to gpu_single.sh.
set -uo pipefail
source bench/gpu_env.sh
# The test binaries read their fixtures at the path they were built in.
mkdir -p /work && ln -sfn "$PWD" /work/main
for t in .carry/tests/*; do
  echo "== $(basename "$t") --ignored"
  "$t" --ignored --test-threads 1 2>&1 | grep -E '^test |test result|panicked|assert' | head -20
done
bash bench/gpu_smoke.sh
ZK_BINS="train ${BEFORE:-}" PEERS="${PEERS:-zerokit}" bash bench/gpu_single.sh ${RUNS:-gpt2-xl:fp16:8 gpt2:bf16:16}
