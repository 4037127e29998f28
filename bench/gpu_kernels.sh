#!/usr/bin/env bash
# One call on a GPU machine for issue 13's kernels and attention choice: the GPU tests of the
# carried test binaries (the fused classifier against libtorch, the head backward against
# autograd, two deterministic runs compared bit for bit), a profile of each model's step with
# and without the fused kernels, then the step time of this build in its variants against
# torch.compile in the same call (bench/gpu_single.sh). From the repo root, with .carry/bin/train
# and the test binaries in .carry/tests (strip -o .carry/tests/NAME target/release/deps/NAME-HASH):
#   COMMIT=$(git rev-parse --short HEAD) RUNS="gpt2:bf16:16" bash bench/gpu_kernels.sh
# Variants: train (fused kernels, libtorch's attention order), train-unfused (ZEROKIT_FUSED=0:
# libtorch's ops for the classifier), train-cudnn (attention = "cudnn"), train-det
# (deterministic = true). ZK_BINS picks among them for the benchmark, PROFILE_BINS (default
# train) for the profiles, each of which also writes a kernel trace of one step, totalled by
# tools/trace_summary.py. TESTS=0 skips the tests, PROFILE=0 the profiles, BENCH=0 the
# benchmark; PEERS (default "zerokit compile") goes to gpu_single.sh.
set -uo pipefail
source bench/gpu_env.sh
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
# The test binaries read fixtures and the train binary at the paths they were built with.
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
printf '#!/bin/sh\nZEROKIT_FUSED=0 exec "$(dirname "$0")/train" "$@"\n' > .carry/bin/train-unfused
printf '#!/bin/sh\nexec "$(dirname "$0")/train" --set attention=cudnn "$@"\n' > .carry/bin/train-cudnn
printf '#!/bin/sh\nexec "$(dirname "$0")/train" --set deterministic=true "$@"\n' > .carry/bin/train-det
chmod +x .carry/bin/train-unfused .carry/bin/train-cudnn .carry/bin/train-det
RUNS=${RUNS:-gpt2:bf16:16 gpt2-xl:fp16:8}

if [ "${TESTS:-1}" != 0 ]; then
  for t in .carry/tests/*; do
    echo "== $(basename "$t") --ignored"
    "$t" --ignored --test-threads 1 --nocapture 2>&1 | tee -a "$OUTDIR/gpu-tests.txt" |
      grep -E '^test |test result|panicked|assert|within|difference' | head -40
  done
fi

if [ "${PROFILE:-1}" != 0 ]; then
  work=$(mktemp -d)
  random_tokens "$work/data"
  for run in $RUNS; do
    IFS=: read -r model dtype batch <<< "$run"
    for bin in ${PROFILE_BINS:-train}; do
      dir="$work/$bin-$model"
      .carry/bin/$bin --profile --set model="$model" --set block_size=1024 --set vocab_size=50304 \
        --set batch_size="$batch" --set max_iters=14 --set eval_iters=0 --set log_interval=7 \
        --set dtype="$dtype" --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
        --set out_dir="$dir" --set warmup_iters=0 > "$dir.log" 2>&1
      echo "$bin $model $dtype mb$batch: $(grep -h 'profile at step 14' "$dir/logs/rank000.log" | sed 's/.*profile at/profile at/')" |
        tee -a "$OUTDIR/profile.txt"
      for t in "$dir"/logs/trace_*.json; do
        [ -f "$t" ] && python3 tools/trace_summary.py "$t" --top 30 | tee "$OUTDIR/trace-$bin-$model-$dtype.txt"
      done
    done
  done
  rm -rf "$work"
fi

[ "${BENCH:-1}" = 0 ] ||
  ZK_BINS="${ZK_BINS:-train train-unfused train-cudnn}" PEERS="${PEERS:-zerokit compile}" bash bench/gpu_single.sh $RUNS
