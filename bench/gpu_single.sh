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

# Runs "$@" while sampling the GPU's used memory every 100 ms; sets PEAK (GiB) and RC.
with_peak() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$work/mem" &
  local smi=$!
  "$@"; RC=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PEAK=$(awk 'BEGIN{m=0}{if($1>m)m=$1}END{printf "%.2f", m/1024}' "$work/mem")
}

# record PEER MODEL DTYPE BATCH OUTFILE LOGFILE COMMAND: one JSON line for the contender, from its
# own line in OUTFILE (a peer) or from zerokit's metrics.jsonl (OUTFILE ends in .jsonl), with
# what this call knows added; a contender with no line gets one with the end of its log as error.
record() {
  python3 - "$@" "$RC" "$PEAK" "$WARMUP" "$STEPS" "$SEQ" "$DEVICE" "$DATE" "$COMMIT" "$BENCH_COMMAND" <<'PY' | tee -a "$RESULTS" "$CALL"
import json, statistics, sys
(peer, model, dtype, batch, out, logf, command, rc, peak, warmup, steps, seq,
 device, date, commit, bench_command) = sys.argv[1:]
batch, rc, warmup, seq = int(batch), int(rc), int(warmup), int(seq)
def lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []
d = None
if out.endswith("metrics.jsonl"):  # zerokit
    rows = [json.loads(l) for l in lines(out) if '"time_ms"' in l]
    timed = [r for r in rows if r["step"] > warmup]
    if timed:
        ms = statistics.median(r["time_ms"] for r in timed)
        d = {"peer": peer, "model": model, "dtype": dtype, "batch": batch, "seq": seq, "gpus": 1,
             "warmup": warmup, "steps": len(timed), "step_ms": ms, "tokens_per_s": batch * seq / (ms / 1e3),
             "mfu": statistics.median(r["mfu"] for r in timed) / 100, "loss": rows[-1]["loss"],
             "losses": [r["loss"] for r in rows], "skipped_steps": sum(r["skipped"] for r in rows)}
else:
    found = [l for l in lines(out) if l.startswith('{"peer"')]
    d = json.loads(found[-1]) if found else None
if d is None:
    tail = [l for l in lines(logf) if l.strip()][-3:]
    why = "timed out" if rc in (124, 137) else f"exit {rc}"
    d = {"peer": peer, "model": model, "dtype": dtype, "batch": batch, "seq": seq,
         "error": why + (": " + " / ".join(tail)[-400:] if tail else "")}
d.update({"exit": rc, "peak_used_gib_nvidia_smi": float(peak), "device": device, "date": date,
          "commit": commit, "command": command, "bench_command": bench_command})
print(json.dumps(d), flush=True)
PY
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
