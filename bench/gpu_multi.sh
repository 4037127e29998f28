#!/usr/bin/env bash
# Multi-GPU run of `train` (issue 5) on one host, in one call:
#   1. correctness: NCCL ZeRO stages 0/1/2 on all GPUs match one GPU on the same global batch
#      (tiny GPT-2, fp32, 20 steps);
#   2. benchmark: GPT-2 XL (or $MODEL), fp16, seq 1024, micro-batch 8 per GPU, zerokit stage 2
#      next to DeepSpeed ZeRO-2, PyTorch DDP and FSDP SHARD_GRAD_OP (tools/bench_zero_peer.py).
# Usage on the GPU machine, from the repo root, binaries in .carry/bin, wheels in .carry/whl:
#   bash bench/gpu_multi.sh [correctness|bench|all]
set -uo pipefail
WHAT=${1:-all}
MODEL=${MODEL:-gpt2-xl}
BATCH=${BATCH:-8}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
PEERS=${PEERS:-"deepspeed ddp fsdp"}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
source bench/gpu_env.sh
NGPU=$(nvidia-smi -L | wc -l)
work=$(mktemp -d)
python3 - "$work/data" <<'PY'
import sys, os, numpy as np
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 4_000_000), ("val", 200_000)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(f"{d}/{split}.bin")
PY

zk() { # zk OUT_DIR NPROC ARGS... : one zerokit run
  local out=$1 n=$2; shift 2
  .carry/bin/train --nproc-per-node "$n" --master-port $((29500 + RANDOM % 1000)) --set dataset="$work/data" \
    --set out_dir="$out" --set sample_tokens=0 --set log_interval=1 --set device=cuda "$@" > "$out.log" 2>&1
}

if [ "$WHAT" = correctness ] || [ "$WHAT" = all ]; then
  tiny=(--set model=custom --set n_layer=2 --set n_head=4 --set n_embd=128 --set block_size=64
        --set vocab_size=50304 --set max_iters=20 --set eval_iters=0 --set dtype=fp32 --set warmup_iters=2)
  zk "$work/ref" 1 "${tiny[@]}" --set batch_size=$((NGPU * 4)) || tail -20 "$work/ref.log"
  for stage in 0 1 2; do
    zk "$work/s$stage" "$NGPU" "${tiny[@]}" --set batch_size=4 --set zero_stage=$stage || tail -20 "$work/s$stage.log"
    python3 - "$work/ref/metrics.jsonl" "$work/s$stage/metrics.jsonl" "$stage" "$NGPU" <<'PY' | tee -a "$OUTDIR/multi.jsonl"
import json, sys
ref, run, stage, n = sys.argv[1:]
load = lambda p: [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
try:
    a, b = load(ref), load(run)
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else None
except FileNotFoundError:
    a, b, rel = [], [], None
print(json.dumps({"check": "nccl_matches_one_gpu", "stage": int(stage), "gpus": int(n), "steps": len(b),
                  "max_rel_loss_diff": rel, "ok": rel is not None and rel <= 1e-5}))
PY
  done
fi

if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  if [ -d .carry/whl ] && ! python3 -c 'import deepspeed' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
    (cd "$work" && tar xzf "$OLDPWD"/.carry/whl/deepspeed-*.tar.gz && cd deepspeed-* &&
      DS_BUILD_OPS=0 PYTHONPATH=/tmp/site python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/dsw" . &&
      python3 -m pip install -q --no-index --no-deps --target /tmp/site "$work"/dsw/*.whl)
    export PYTHONPATH=/tmp/site
  fi
  run="$work/zk-bench"
  zk "$run" "$NGPU" --set model="$MODEL" --set block_size=1024 --set vocab_size=50304 --set batch_size=$BATCH \
    --set max_iters=$((STEPS + WARMUP)) --set eval_iters=0 --set dtype=fp16 --set zero_stage=2 --set warmup_iters=0 &
  zpid=$!
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/mem" & smi=$!
  wait $zpid; rc=$?
  kill $smi; wait $smi 2>/dev/null
  [ $rc -eq 0 ] || tail -30 "$run.log"
  python3 - "$run/metrics.jsonl" "$MODEL" "$NGPU" "$BATCH" "$WARMUP" "$work/mem" "$rc" <<'PY' | tee -a "$OUTDIR/multi.jsonl"
import json, statistics, sys
path, model, n, batch, warmup, mem, rc = sys.argv[1:]
peak = max((float(l) for l in open(mem) if l.strip()), default=0) / 1024
try:
    rows = [json.loads(l) for l in open(path) if '"time_ms"' in l]
except FileNotFoundError:
    rows = []
rows = [r for r in rows if r["step"] > int(warmup)]
out = {"peer": "zerokit", "model": model, "dtype": "fp16", "gpus": int(n), "batch_per_gpu": int(batch), "seq": 1024,
       "zero_stage": 2, "exit": int(rc), "peak_used_gib_nvidia_smi": peak}
if rows:
    ms = statistics.median(r["time_ms"] for r in rows)
    out.update({"step_ms": ms, "tokens_per_s": int(n) * int(batch) * 1024 / (ms / 1e3),
                "mfu": statistics.median(r["mfu"] for r in rows) / 100, "loss": rows[-1]["loss"],
                "skipped_steps": sum(r["skipped"] for r in rows)})
print(json.dumps(out), flush=True)
PY
  for peer in $PEERS; do
    torchrun --nproc-per-node "$NGPU" --master-port $((30500 + RANDOM % 1000)) tools/bench_zero_peer.py --peer "$peer" \
      --model "$MODEL" --batch $BATCH --steps $STEPS --warmup $WARMUP 2> "$work/$peer.err" | tail -1 | tee -a "$OUTDIR/multi.jsonl"
    grep -q . "$work/$peer.err" && grep -iE "error|Traceback" "$work/$peer.err" | tail -3
  done
fi
rm -rf "$work"
