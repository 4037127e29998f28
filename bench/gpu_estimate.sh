#!/usr/bin/env bash
# `ckpt estimate` against the memory `train` really uses (issue 3), on the GPU machine:
# for each model, ZeRO stage, micro-batch and activation checkpointing setting, a short fp16 run
# on all GPUs; the peak is the device memory in use after a step (the caching allocator keeps
# what a step reserved) minus what was in use before the model (the CUDA context), both logged
# by `train` in metrics.jsonl; the estimate is `ckpt estimate --json` for the same shape, with
# zerokit's largest gradient bucket (the embeddings) as the communication buffer.
# Usage, from the repo root with the binaries in .carry/bin:
#   MODELS="gpt2 gpt2-medium gpt2-xl" STAGES="0 1 2" BATCHES="1 4 8" bash bench/gpu_estimate.sh
# Writes JSON lines to $OUT/estimate.jsonl (or bench/results/estimate.jsonl).
set -uo pipefail
MODELS=${MODELS:-"gpt2 gpt2-medium gpt2-xl"}
STAGES=${STAGES:-"0 1 2"}
BATCHES=${BATCHES:-"1 4 8"}
CKPTS=${CKPTS:-"false true"}
STEPS=${STEPS:-4}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
source bench/gpu_env.sh
NGPU=$(nvidia-smi -L | wc -l)
work=$(mktemp -d)
random_tokens "$work/data"
declare -A EMBD=([gpt2]=768 [gpt2-medium]=1024 [gpt2-large]=1280 [gpt2-xl]=1600)

for model in $MODELS; do
  bucket=$(( (50304 + 1024) * ${EMBD[$model]} ))
  for stage in $STAGES; do
    for b in $BATCHES; do
      for ck in $CKPTS; do
        run="$work/$model-$stage-$b-$ck"
        timeout 300 .carry/bin/train --nproc-per-node "$NGPU" --master-port $((20000 + RANDOM % 20000)) \
          --set dataset="$work/data" --set out_dir="$run" --set model="$model" --set block_size=1024 \
          --set vocab_size=50304 --set batch_size="$b" --set max_iters="$STEPS" --set eval_iters=0 \
          --set log_interval=1 --set sample_tokens=0 --set device=cuda --set dtype=fp16 \
          --set zero_stage="$stage" --set activation_checkpointing="$ck" > "$run.log" 2>&1
        rc=$?
        ckflag=(); [ "$ck" = true ] && ckflag=(--activation-checkpointing)
        .carry/bin/ckpt estimate --model "$model" --vocab-size 50304 --gpus-per-node "$NGPU" --dtype fp16 \
          --micro-batch "$b" --seq-len 1024 --bucket-elems "$bucket" "${ckflag[@]}" --json > "$run.est"
        python3 - "$run/metrics.jsonl" "$run.est" "$model" "$stage" "$b" "$ck" "$NGPU" "$rc" <<'PY' | tee -a "$OUTDIR/estimate.jsonl"
import json, sys
metrics, est, model, stage, b, ck, n, rc = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(metrics)]
except FileNotFoundError:
    rows = []
ctx = next((r["gpu_context_gib"] for r in rows if "gpu_context_gib" in r), None)
peaks = [r["gpu_mem_gib"] for r in rows if r.get("gpu_mem_gib") is not None]
e = json.load(open(est))
row = next(r for r in e["rows"] if r["stage"] == int(stage) and r["offload"] == "none")
est_gib = row["gpu_total"] / 2**30
out = {"model": model, "stage": int(stage), "micro_batch": int(b), "activation_checkpointing": ck == "true",
       "gpus": int(n), "exit": int(rc), "context_gib": ctx, "estimate_gib": round(est_gib, 3)}
if peaks and ctx is not None:
    meas = max(peaks) - ctx
    out.update({"measured_gib": round(meas, 3), "error": round((est_gib - meas) / meas, 4)})
print(json.dumps(out), flush=True)
PY
      done
    done
  done
done
rm -rf "$work"
