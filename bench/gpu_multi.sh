#!/usr/bin/env bash
# Multi-GPU runs of `train` (issue 5) on one host, in one call. Parts (default: all):
#   correctness  NCCL ZeRO stages 0/1/2 on all GPUs match one GPU on the same global batch (tiny
#                GPT-2, fp32, 20 steps), launched by zerokit itself and by `torchrun --no-python`;
#   bench        GPT-2 XL (or $MODEL), fp16, seq 1024, micro-batch 8 per GPU: zerokit stage 2 on
#                1 GPU and on all GPUs (scaling), next to the peers of tools/bench_zero_peer.py
#                ($PEERS: DeepSpeed ZeRO-2, PyTorch DDP, DDP + torch.compile, FSDP SHARD_GRAD_OP)
#                on all GPUs, on the same tokens (train.bin) as zerokit;
#   nodes        two simulated nodes (half the GPUs each) talking over sockets only (NCCL's P2P,
#                shared memory and InfiniBand off), GPT-2 124M, against the same GPUs as one node;
#   curve        GPT-2 124M trained on tiny Shakespeare, on 1 GPU and on all GPUs at the same
#                global batch: the two loss curves (curve-1.jsonl, curve-N.jsonl).
# Usage on the GPU machine, from the repo root, binaries in .carry/bin, wheels in .carry/whl:
#   bash bench/gpu_multi.sh [correctness bench nodes curve]
# Writes JSON lines to $OUT/multi.jsonl (or bench/results/multi.jsonl); failing runs' log tails
# go to $OUT/fail.log.
set -uo pipefail
PARTS=${*:-correctness bench nodes curve}
MODEL=${MODEL:-gpt2-xl}
BATCH=${BATCH:-8}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
PEERS=${PEERS:-"deepspeed ddp ddp-compile fsdp"}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/multi.jsonl"
FAIL="$OUTDIR/fail.log"
source bench/gpu_env.sh
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
NGPU=$(nvidia-smi -L | wc -l)
work=$(mktemp -d)
random_tokens "$work/data"
port() { echo $((20000 + RANDOM % 20000)); }
has() { [[ " $PARTS " == *" $1 "* ]]; }

# zk LAUNCH OUT_DIR NPROC ARGS... : one zerokit run, launched by zerokit (zk) or torchrun (tr).
zk() {
  local launch=$1 out=$2 n=$3; shift 3
  local common=(--set dataset="$work/data" --set out_dir="$out" --set sample_tokens=0 --set log_interval=1
                --set device=cuda --set eval_iters=0)
  if [ "$launch" = tr ] && [ "$n" -gt 1 ]; then
    timeout 300 torchrun --nproc-per-node "$n" --master-port "$(port)" --no-python .carry/bin/train "${common[@]}" "$@" \
      > "$out.log" 2>&1
  else
    timeout 300 .carry/bin/train --nproc-per-node "$n" --master-port "$(port)" "${common[@]}" "$@" > "$out.log" 2>&1
  fi
  local rc=$?
  [ $rc -eq 0 ] || { echo "== $out (exit $rc)"; grep -h "NCCL WARN" "$out.log" "$out"/logs/*.log 2>/dev/null | sort -u | head -20; tail -25 "$out.log"; } >> "$FAIL"
  return $rc
}

# Median step figures of a metrics.jsonl after warm-up, as JSON fields.
summarize() {
  python3 - "$@" <<'PY'
import json, statistics, sys
path, n, batch, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    rows = [json.loads(l) for l in open(path) if '"time_ms"' in l]
except FileNotFoundError:
    rows = []
rows = [r for r in rows if r["step"] > warmup]
out = {}
if rows:
    ms = statistics.median(r["time_ms"] for r in rows)
    out = {"step_ms": round(ms, 2), "tokens_per_s": round(n * batch * 1024 / (ms / 1e3)),
           "mfu": round(statistics.median(r["mfu"] for r in rows) / 100, 4), "loss": rows[-1]["loss"],
           "skipped_steps": sum(r["skipped"] for r in rows)}
print(json.dumps(out)[1:-1])
PY
}

# Runs "$@" while sampling every GPU's used memory; sets PEAK (GiB, max over GPUs).
with_peak() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/mem" &
  local smi=$!
  "$@"; local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PEAK=$(awk 'BEGIN{m=0}{if($1>m)m=$1}END{printf "%.2f", m/1024}' "$work/mem")
  return $rc
}

if has correctness; then
  tiny=(--set model=custom --set n_layer=2 --set n_head=4 --set n_embd=128 --set block_size=64
        --set vocab_size=50304 --set max_iters=20 --set dtype=fp32 --set warmup_iters=2)
  zk zk "$work/ref" 1 "${tiny[@]}" --set batch_size=$((NGPU * 4))
  for launch in zk tr; do
    for stage in 0 1 2; do
      zk $launch "$work/$launch-s$stage" "$NGPU" "${tiny[@]}" --set batch_size=4 --set zero_stage=$stage
      python3 - "$work/ref/metrics.jsonl" "$work/$launch-s$stage/metrics.jsonl" $stage "$NGPU" $launch <<'PY' | tee -a "$RESULTS"
import json, sys
ref, run, stage, n, launch = sys.argv[1:]
load = lambda p: [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
try:
    a, b = load(ref), load(run)
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else None
except FileNotFoundError:
    a, b, rel = [], [], None
print(json.dumps({"check": "nccl_matches_one_gpu", "launcher": {"zk": "zerokit", "tr": "torchrun"}[launch],
                  "stage": int(stage), "gpus": int(n), "steps": len(b), "max_rel_loss_diff": rel,
                  "ok": rel is not None and rel <= 1e-5}))
PY
    done
  done
fi

if has bench; then
  xl=(--set model="$MODEL" --set block_size=1024 --set vocab_size=50304 --set batch_size=$BATCH
      --set max_iters=$((STEPS + WARMUP)) --set dtype=fp16 --set zero_stage=2 --set warmup_iters=0)
  for n in ${SCALING:-1 $NGPU}; do
    run="$work/zk-bench-$n"
    with_peak zk zk "$run" "$n" "${xl[@]}" --gpus "$(seq -s, 0 $((n - 1)))"; rc=$?
    echo "{\"peer\": \"zerokit\", \"model\": \"$MODEL\", \"dtype\": \"fp16\", \"gpus\": $n, \"batch_per_gpu\": $BATCH, \"seq\": 1024, \"zero_stage\": 2, \"exit\": $rc, \"peak_used_gib_nvidia_smi\": $PEAK, $(summarize "$run/metrics.jsonl" "$n" "$BATCH" "$WARMUP")}" | sed 's/, }/}/' | tee -a "$RESULTS"
  done
  install_deepspeed
  for peer in $PEERS; do
    # torch.compile of GPT-2 XL in every rank takes minutes: a longer limit than zerokit's.
    with_peak timeout 600 torchrun --nproc-per-node "$NGPU" --master-port "$(port)" tools/bench_zero_peer.py --peer "$peer" \
      --model "$MODEL" --dtype fp16 --batch $BATCH --steps $STEPS --warmup $WARMUP --data "$work/data" \
      > "$work/$peer.out" 2> "$work/$peer.err"; rc=$?
    line=$(grep '^{"peer"' "$work/$peer.out" | tail -1)
    [ -n "$line" ] || line="{\"peer\": \"$peer\", \"model\": \"$MODEL\", \"gpus\": $NGPU, \"error\": \"exit $rc, no result line\"}"
    echo "${line%\}}, \"exit\": $rc, \"peak_used_gib_nvidia_smi\": $PEAK}" | tee -a "$RESULTS"
    [ $rc -eq 0 ] || { echo "== $peer (exit $rc)"; tail -20 "$work/$peer.err"; } >> "$FAIL"
  done
fi

if has nodes && [ "$NGPU" -ge 2 ]; then
  half=$((NGPU / 2)); small=(--set model=gpt2 --set block_size=1024 --set vocab_size=50304 --set batch_size=8
        --set max_iters=$((STEPS + WARMUP)) --set dtype=bf16 --set zero_stage=2 --set warmup_iters=0)
  zk zk "$work/one-node" "$NGPU" "${small[@]}"
  echo "{\"check\": \"nodes\", \"nodes\": 1, \"gpus\": $NGPU, \"transport\": \"nvlink\", $(summarize "$work/one-node/metrics.jsonl" "$NGPU" 8 "$WARMUP")}" | sed 's/, }/}/' | tee -a "$RESULTS"
  p=$(port); g0=$(seq -s, 0 $((half - 1))); g1=$(seq -s, $half $((NGPU - 1)))
  sock=(env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo)
  for r in 1 0; do
    g=$g0; [ $r = 1 ] && g=$g1
    "${sock[@]}" timeout 300 .carry/bin/train --nnodes 2 --node-rank $r --nproc-per-node $half --gpus "$g" \
      --master-addr 127.0.0.1 --master-port "$p" --set dataset="$work/data" --set out_dir="$work/two-nodes" \
      --set sample_tokens=0 --set log_interval=1 --set device=cuda --set eval_iters=0 "${small[@]}" > "$work/node$r.log" 2>&1 &
  done
  wait
  [ -s "$work/two-nodes/metrics.jsonl" ] || { echo "== two nodes"; tail -20 "$work"/node*.log; } >> "$FAIL"
  echo "{\"check\": \"nodes\", \"nodes\": 2, \"gpus\": $NGPU, \"transport\": \"sockets\", $(summarize "$work/two-nodes/metrics.jsonl" "$NGPU" 8 "$WARMUP")}" | sed 's/, }/}/' | tee -a "$RESULTS"
fi

if has curve; then
  .carry/bin/prepare data/tinyshakespeare.txt --out "$work/shakespeare" --force > /dev/null
  cv=(--set dataset="$work/shakespeare" --set model=gpt2 --set block_size=256 --set vocab_size=50304
      --set max_iters=200 --set eval_interval=50 --set eval_iters=10 --set learning_rate=6e-4 --set min_lr=6e-5
      --set warmup_iters=20 --set lr_decay_iters=200 --set dtype=bf16 --set zero_stage=2)
  zk zk "$work/curve-1" 1 "${cv[@]}" --set batch_size=$((8 * NGPU)) --set eval_iters=10
  zk zk "$work/curve-$NGPU" "$NGPU" "${cv[@]}" --set batch_size=8 --set eval_iters=10
  cp "$work/curve-1/metrics.jsonl" "$OUTDIR/curve-1.jsonl" 2>/dev/null
  cp "$work/curve-$NGPU/metrics.jsonl" "$OUTDIR/curve-$NGPU.jsonl" 2>/dev/null
fi
rm -rf "$work"
