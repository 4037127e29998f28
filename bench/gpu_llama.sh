#!/usr/bin/env bash
# Issue 15's one-GPU benchmark: a Llama-3.2-1B-shaped model in bf16, zerokit `train` (stage 0, its
# default and fastest settings) next to transformers' LlamaForCausalLM with SDPA and fused AdamW,
# eager and torch.compile (tools/bench_llama_peer.py: fp32 weights with autocast bf16), on the
# same config.json, micro-batch, sequence and tokens, in one call; and `ckpt estimate` for the
# same settings against `train`'s measured peak (issue 15 asks within 10%).
# Run on the GPU machine from the repo root, with .carry/bin/{train,ckpt} and, when the machine's
# Python lacks transformers, its wheels in .carry/whl-hf (tools/carry_hf_wheels.sh):
#   COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_llama.sh
# Settings: PRESET (llama-3.2-1b), BATCH (8), SEQ (2048), WARMUP (4), STEPS (12), PEERS ("zerokit
# eager compile"), TIMEOUT per contender (240 s), PEER_ARGS (more arguments for the peers).
# Time on one H200, estimated: data and config 10 s; zerokit 40 s (start, 16 steps of ~0.35 s);
# eager 40 s; compile 2-3 min (Inductor compiles 16 layers forward and backward); about 4-5 min in
# all, under 9 with every contender at its timeout cut by what is left (BUDGET, 520 s).
# Writes to $OUT/<date>-llama/ (bench/results/<date>-llama/ without OUT): one JSON per contender
# (zerokit.json, pytorch-eager.json, pytorch-compile.json), estimate.json, config.json (the
# model), table.md, and all.jsonl with every line.
set -uo pipefail
PRESET=${PRESET:-llama-3.2-1b}
BATCH=${BATCH:-8}
SEQ=${SEQ:-2048}
WARMUP=${WARMUP:-4}
STEPS=${STEPS:-12}
PEERS=${PEERS:-zerokit eager compile}
TIMEOUT=${TIMEOUT:-240}
BUDGET=${BUDGET:-520}
PEER_ARGS=${PEER_ARGS:-}
# cpu: a smoke test of this script (with PRESET=llama-tiny and a fake nvidia-smi on PATH).
DEV=${DEV:-cuda}
DATE=$(date -u +%Y-%m-%d)
OUTDIR=${OUT:-bench/results}/$DATE-llama
mkdir -p "$OUTDIR"
source bench/gpu_env.sh
install_hf || exit 1
BENCH_COMMAND="DEV=$DEV PRESET=$PRESET BATCH=$BATCH SEQ=$SEQ WARMUP=$WARMUP STEPS=$STEPS PEERS=\"$PEERS\" PEER_ARGS=\"$PEER_ARGS\" bash bench/gpu_llama.sh"
DEVICE="$(nvidia-smi -L | wc -l)x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($(hostname))"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
work=$(mktemp -d)
log() { echo "[gpu_llama $(date -u +%H:%M:%S)] $*" >&2; }
has() { [[ " $PEERS " == *" $1 "* ]]; }
# The contender's time limit: TIMEOUT, or what is left of BUDGET if less (at least 30 s).
limit() { local left=$((BUDGET - SECONDS)); [ $left -lt "$TIMEOUT" ] || left=$TIMEOUT; [ $left -gt 30 ] || left=30; echo $left; }
random_tokens "$work/data"

# The model: zerokit's own preset shape with Llama 3's 128256-token vocabulary, as a config.json
# that train (model = FILE), ckpt estimate and the peers all read. The estimate's communication
# buffer is zerokit's largest gradient bucket (the embedding), as in bench/gpu_estimate.sh.
cfg="$OUTDIR/config.json"
.carry/bin/ckpt estimate --model "$PRESET" --vocab-size 128256 --json > "$work/shape.json" &&
  python3 tools/bench_llama_peer.py --write-config "$cfg" --estimate "$work/shape.json" || { log "no config"; exit 1; }
bucket=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["largest_layer_params"])' "$work/shape.json")
.carry/bin/ckpt estimate --model "$cfg" --dtype bf16 --micro-batch "$BATCH" --seq-len "$SEQ" \
  --bucket-elems "$bucket" --gpu-memory 140GiB --json > "$work/estimate.json"

if has zerokit; then
  dir="$work/zk"
  cmd=(.carry/bin/train --set model="$cfg" --set block_size="$SEQ" --set batch_size="$BATCH"
       --set max_iters=$((STEPS + WARMUP)) --set eval_iters=0 --set log_interval=1 --set dtype=bf16
       --set device="$DEV" --set zero_stage=0 --set sample_tokens=0 --set dataset="$work/data"
       --set out_dir="$dir" --set warmup_iters=0)
  log "zerokit $PRESET bf16 mb$BATCH seq $SEQ"
  with_peak timeout -k 10 "$(limit)" "${cmd[@]}" > "$dir.log" 2>&1
  python3 tools/bench_record.py zerokit "$PRESET" bf16 "$BATCH" "$dir/metrics.jsonl" "$dir.log" "${cmd[*]}" \
    "$RC" "$PEAK" "$WARMUP" "$STEPS" "$SEQ" "$DEVICE" "$DATE" "$COMMIT" "$BENCH_COMMAND" > "$OUTDIR/zerokit.json"
  cat "$OUTDIR/zerokit.json"
  # The estimate's stage-0 row against train's peak less the CUDA context (both in its metrics).
  python3 - "$OUTDIR/zerokit.json" "$work/estimate.json" <<'PY' | tee "$OUTDIR/estimate.json"
import json, sys
zk, est = (json.load(open(p)) for p in sys.argv[1:])
row = next(r for r in est["rows"] if r["stage"] == 0 and r["offload"] == "none")
out = {"what": "ckpt estimate stage 0 (gpu_total) against train's peak gpu_mem_gib less gpu_context_gib",
       "estimate_gib": round(row["gpu_total"] / 2**30, 3), "estimate_rows_gib": {k: round(v / 2**30, 3) for k, v in row["gpu"].items()},
       "setup": est["setup"], "num_params": est["num_params"]}
if zk.get("gpu_mem_peak_gib") is not None and zk.get("gpu_context_gib") is not None:
    meas = zk["gpu_mem_peak_gib"] - zk["gpu_context_gib"]
    out.update({"measured_gib": round(meas, 3), "context_gib": zk["gpu_context_gib"],
                "error": round((out["estimate_gib"] - meas) / meas, 4)})
print(json.dumps(out))
PY
fi

for mode in eager compile; do
  has "$mode" || continue
  base="$work/$mode"
  cmd=(python3 tools/bench_llama_peer.py --mode "$mode" --config "$cfg" --name "$PRESET" --dtype bf16
       --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" --data "$work/data" --device "$DEV" $PEER_ARGS)
  log "pytorch-$mode"
  with_peak timeout -k 10 "$(limit)" "${cmd[@]}" > "$base.out" 2> "$base.err"
  python3 tools/bench_record.py "pytorch-$mode" "$PRESET" bf16 "$BATCH" "$base.out" "$base.err" "${cmd[*]}" \
    "$RC" "$PEAK" "$WARMUP" "$STEPS" "$SEQ" "$DEVICE" "$DATE" "$COMMIT" "$BENCH_COMMAND" > "$OUTDIR/pytorch-$mode.json"
  cat "$OUTDIR/pytorch-$mode.json"
  tail -5 "$base.err" >&2
done

cat "$OUTDIR"/zerokit.json "$OUTDIR"/pytorch-*.json > "$OUTDIR/all.jsonl" 2>/dev/null
{ python3 tools/bench_table.py "$OUTDIR/all.jsonl"
  [ -s "$OUTDIR/estimate.json" ] && python3 - "$OUTDIR/estimate.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
m = e.get("measured_gib")
got = (f"{m:.2f} GiB (its peak less the {e['context_gib']:.2f} GiB CUDA context): error {100 * e['error']:+.1f}%"
       if m is not None else "nothing (no run)")
print(f"ckpt estimate, stage 0: {e['estimate_gib']:.2f} GiB; train measured {got}")
PY
} | tee "$OUTDIR/table.md"
log "done in $SECONDS s"
rm -rf "$work"
