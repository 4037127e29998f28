#!/usr/bin/env bash
# The training stall of a checkpoint save (issue 13): zerokit's background save (async_save =
# true), its blocking save (async_save = false) and DeepSpeed's synchronous save_checkpoint, on
# the same GPT-2 XL run, in one call. Run on the GPU machine from the repo root, the release
# binaries in .carry/bin and DeepSpeed's wheels in .carry/whl (../shared/GPU.md):
#   COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_save.sh [MODEL:DTYPE:BATCH]
# (default gpt2-xl:fp16:8). zerokit trains ITERS steps (default 12) and saves every EVERY (default
# 6) plus `final`, with async_save in each of ASYNC (default "true false"). A background write
# that is still going when the next save comes makes that save wait: give EVERY enough steps
# for the disk to write a checkpoint;
# its rank 0 log gives each save's stall ("save of TAG: training paused S s") and background
# write time ("saved checkpoint DIR: B written, hashed and synced in T s"), and metrics.jsonl
# the step times around the background write. Checkpoints go under WORK (default /tmp): a local
# disk. JSON lines to $OUT/save.jsonl (bench/results/save.jsonl without OUT).
set -uo pipefail
RUN=${1:-gpt2-xl:fp16:8}
IFS=: read -r model dtype batch <<< "$RUN"
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/save.jsonl"
source bench/gpu_env.sh
install_deepspeed
DATE=$(date -u +%Y-%m-%d)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($(hostname))"
work=$(mktemp -d -p "${WORK:-/tmp}")
random_tokens "$work/data"
df -h "$work" | tail -1

for async in ${ASYNC:-true false}; do
  dir="$work/zk-$async"
  .carry/bin/train --set model="$model" --set block_size=1024 --set vocab_size=50304 \
    --set batch_size="$batch" --set dtype="$dtype" --set device=cuda --set max_iters=${ITERS:-12} \
    --set eval_interval=${EVERY:-6} --set eval_iters=1 --set always_save_checkpoint=true --set keep_last=1 \
    --set log_interval=1 --set sample_tokens=0 --set warmup_iters=0 --set async_save=$async \
    --set dataset="$work/data" --set out_dir="$dir" > "$dir.log" 2>&1
  python3 - "$dir" "$async" "$model" "$dtype" "$batch" "$DEVICE" "$DATE" "$COMMIT" <<'PY' | tee -a "$RESULTS"
import json, re, sys
d, async_save, model, dtype, batch, device, date, commit = sys.argv[1:]
log = open(f"{d}/logs/rank000.log").read()
stalls = {m[0]: float(m[1]) for m in re.findall(r"save of (\S+): training paused ([\d.]+) s", log)}
writes = {m[0].rsplit("/", 1)[-1]: float(m[1])
          for m in re.findall(r"saved checkpoint (\S+): .* synced in ([\d.]+) s", log)}
rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"time_ms"' in l]
print(json.dumps({"peer": "zerokit", "async_save": async_save == "true", "model": model, "dtype": dtype,
                  "batch": int(batch), "stall_s": stalls, "write_s": writes,
                  "step_ms": {r["step"]: r["time_ms"] for r in rows},
                  "device": device, "date": date, "commit": commit}), flush=True)
PY
  rm -rf "$dir"
done
python3 tools/bench_save_peer.py --model "$model" --dtype "$dtype" --batch "$batch" --data "$work/data" \
  --save-dir "$work/ds" | tail -1 | tee -a "$RESULTS"
rm -rf "$work"
