#!/usr/bin/env bash
# One-GPU benchmark of `train` against PyTorch eager and torch.compile on the same GPT-2, batch
# and precision, in one call (issue 4). Run on the GPU machine from the repo root with the
# release binaries carried in .carry/bin (bench/README.md):
#   bash bench/gpu_single.sh [MODELS] [DTYPES]     e.g. "gpt2 gpt2-xl" "bf16 fp16"
# Prints one JSON line per run and writes them to $OUT/single.jsonl (or bench/results/).
set -uo pipefail
MODELS=${1:-"gpt2 gpt2-xl"}
DTYPES=${2:-"bf16 fp16"}
BATCH=${BATCH:-8}
STEPS=${STEPS:-16}
WARMUP=${WARMUP:-4}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/single.jsonl"
source bench/gpu_env.sh

work=$(mktemp -d)
random_tokens "$work/data"

peak_mem() { # runs "$@" while sampling the GPU's used memory; prints the peak in GiB to fd 3
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$work/mem" &
  local smi=$!
  "$@"; local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  awk 'BEGIN{m=0}{if($1>m)m=$1}END{printf "%.2f", m/1024}' "$work/mem" >&3
  return $rc
}

for model in $MODELS; do
  for dtype in $DTYPES; do
    run="$work/zk-$model-$dtype"
    exec 3>"$work/peak"
    peak_mem .carry/bin/train --set model="$model" --set block_size=1024 --set vocab_size=50304 \
      --set batch_size=$BATCH --set max_iters=$((STEPS + WARMUP)) --set eval_iters=0 --set log_interval=1 \
      --set dtype=$dtype --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
      --set out_dir="$run" --set warmup_iters=0 > "$run.log" 2>&1
    rc=$?
    exec 3>&-
    python3 - "$run/metrics.jsonl" "$model" "$dtype" "$(cat "$work/peak")" "$rc" "$WARMUP" "$BATCH" <<'PY' | tee -a "$RESULTS"
import json, statistics, sys
path, model, dtype, peak, rc, warmup, batch = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(path) if '"time_ms"' in l]
except FileNotFoundError:
    rows = []
steps = [r for r in rows if r["step"] > int(warmup)]
out = {"peer": "zerokit", "model": model, "dtype": dtype, "batch": int(batch), "seq": 1024, "exit": int(rc),
       "peak_used_gib_nvidia_smi": float(peak)}
if steps:
    ms = statistics.median(r["time_ms"] for r in steps)
    tok = int(batch) * 1024 / (ms / 1e3)
    out.update({"step_ms": ms, "tokens_per_s": tok, "mfu": statistics.median(r["mfu"] for r in steps) / 100,
                "loss": steps[-1]["loss"]})
print(json.dumps(out), flush=True)
PY
    [ $rc -eq 0 ] || tail -20 "$run.log"
    for mode in eager compile; do
      exec 3>"$work/peak"
      line=$(peak_mem python3 tools/bench_gpt2_peer.py --model "$model" --dtype "$dtype" --batch $BATCH \
        --mode $mode --warmup $WARMUP --steps $STEPS 2> "$work/peer.err" | tail -1)
      exec 3>&-
      if [ -n "$line" ]; then
        python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["peak_used_gib_nvidia_smi"]=float(sys.argv[2]); print(json.dumps(d))' "$line" "$(cat "$work/peak")" | tee -a "$RESULTS"
      else
        echo "{\"peer\": \"pytorch-$mode\", \"model\": \"$model\", \"dtype\": \"$dtype\", \"error\": \"$(tail -1 "$work/peer.err" | tr -d '"')\"}" | tee -a "$RESULTS"
      fi
    done
  done
done
rm -rf "$work"
