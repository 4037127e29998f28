#!/usr/bin/env bash
# One-GPU benchmark of `train` against its peers on the same GPT-2, micro-batch, precision and
# tokens, in one call (issues 4 and 13): PyTorch eager and torch.compile for every run, DeepSpeed
# ZeRO-2 for fp16 (tools/bench_gpt2_peer.py; settings in docs/benchmarks.md). Run on the GPU
# machine from the repo root, the release binaries in .carry/bin and DeepSpeed's wheels in
# .carry/whl (../shared/GPU.md):
#   COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_single.sh [MODEL:DTYPE[:BATCH] ...]
# Default runs: gpt2:bf16:16 gpt2-xl:fp16:8 gpt2-xl:bf16:8 (the batch defaults to 16 for gpt2,
# 8 for the others). PEERS (default "zerokit eager compile deepspeed") picks the contenders,
# DS_DTYPES (default fp16) the precisions DeepSpeed runs in; STEPS timed steps after WARMUP;
# PEER_ARGS more arguments for every peer (e.g. --compile-mode max-autotune, --ds-fused-adamw);
# ZK_BINS the zerokit builds to run (default train).
# Each contender's JSON line, with device, date, commit and its command, goes to stdout and
# $OUT/single.jsonl (bench/results/single.jsonl without OUT); the call's table to single.md.
# A contender that fails or outlasts TIMEOUT seconds gets a line with its error; the rest run on.
set -uo pipefail
RUNS=${*:-gpt2:bf16:16 gpt2-xl:fp16:8 gpt2-xl:bf16:8}
PEERS=${PEERS:-zerokit eager compile deepspeed}
DS_DTYPES=${DS_DTYPES:-fp16}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
SEQ=${SEQ:-1024}
PEER_ARGS=${PEER_ARGS:-}
# Train binaries in .carry/bin to run as zerokit, e.g. "train train-a04011c" to set a change
# against the build before it (the second is labelled zerokit-a04011c).
ZK_BINS=${ZK_BINS:-train}
TIMEOUT=${TIMEOUT:-420}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/single.jsonl"
source bench/gpu_env.sh

BENCH_COMMAND="ZK_BINS=\"$ZK_BINS\" PEERS=\"$PEERS\" DS_DTYPES=\"$DS_DTYPES\" STEPS=$STEPS WARMUP=$WARMUP SEQ=$SEQ PEER_ARGS=\"$PEER_ARGS\" bash bench/gpu_single.sh $RUNS"
DEVICE="$(nvidia-smi -L | wc -l)x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($(hostname))"
DATE=$(date -u +%Y-%m-%d)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
work=$(mktemp -d)
CALL="$work/call.jsonl"
random_tokens "$work/data"
has() { [[ " $PEERS " == *" $1 "* ]]; }
log() { echo "[gpu_single $(date -u +%H:%M:%S)] $*" >&2; }
start=$SECONDS

ds_dtype() { [[ " $DS_DTYPES " == *" $1 "* ]]; }
need_ds=no
for run in $RUNS; do IFS=: read -r _ dtype _ <<< "$run"; ds_dtype "$dtype" && need_ds=yes; done
if has deepspeed && [ $need_ds = yes ]; then
  log "installing DeepSpeed from .carry/whl"
  install_deepspeed
  log "done ($((SECONDS - start)) s)"
fi

# record PEER MODEL DTYPE BATCH OUTFILE LOGFILE COMMAND: the contender's JSON line
# (tools/bench_record.py), with what this call knows added.
record() {
  python3 tools/bench_record.py "$@" "$RC" "$PEAK" "$WARMUP" "$STEPS" "$SEQ" "$DEVICE" "$DATE" "$COMMIT" \
    "$BENCH_COMMAND" | tee -a "$RESULTS" "$CALL"
}

for run in $RUNS; do
  IFS=: read -r model dtype batch <<< "$run"
  [ -n "$batch" ] || { batch=8; [ "$model" = gpt2 ] && batch=16; }
  if has zerokit; then
    for bin in $ZK_BINS; do
      label=zerokit; [ "$bin" = train ] || label="zerokit-${bin#train-}"
      dir="$work/zk-$bin-$model-$dtype-$batch"
      cmd=(.carry/bin/$bin --set model="$model" --set block_size=$SEQ --set vocab_size=50304
           --set batch_size="$batch" --set max_iters=$((STEPS + WARMUP)) --set eval_iters=0 --set log_interval=1
           --set dtype="$dtype" --set device=cuda --set sample_tokens=0 --set dataset="$work/data"
           --set out_dir="$dir" --set warmup_iters=0)
      log "$label $model $dtype mb$batch"
      with_peak timeout -k 10 "$TIMEOUT" "${cmd[@]}" > "$dir.log" 2>&1
      record "$label" "$model" "$dtype" "$batch" "$dir/metrics.jsonl" "$dir.log" "${cmd[*]}"
    done
  fi
  for mode in eager compile deepspeed; do
    has "$mode" || continue
    [ "$mode" != deepspeed ] || ds_dtype "$dtype" || continue
    peer=pytorch-$mode; [ "$mode" = deepspeed ] && peer=deepspeed
    base="$work/$mode-$model-$dtype-$batch"
    cmd=(python3 tools/bench_gpt2_peer.py --mode "$mode" --model "$model" --dtype "$dtype" --batch "$batch"
         --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" --data "$work/data" $PEER_ARGS)
    log "$peer $model $dtype mb$batch"
    with_peak timeout -k 10 "$TIMEOUT" "${cmd[@]}" > "$base.out" 2> "$base.err"
    record "$peer" "$model" "$dtype" "$batch" "$base.out" "$base.err" "${cmd[*]}"
  done
done
log "all runs done in $((SECONDS - start)) s"
python3 tools/bench_table.py "$CALL" | tee "$OUTDIR/single.md"
rm -rf "$work"
