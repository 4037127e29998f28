#!/usr/bin/env bash
# Issue 16's one-GPU benchmark: zerokit `train` at ZeRO stage 3 with offload_optimizer (and, when
# time is left, offload_param too) against DeepSpeed 0.19.8 ZeRO-3 with offload_optimizer to the
# CPU (DeepSpeedCPUAdam; tools/bench_zero3_peer.py), on one Llama-3.1-8B-shaped config.json (written
# from zerokit's own preset shape), bf16, activation checkpointing, the same micro-batch, sequence
# and tokens, in one call. Records tokens/s, GPU peak (nvidia-smi, and each one's own allocator
# figure) and host peak (tools/rss_peak.py: RSS of the process tree, and the machine's used memory
# over its value before) for each, with `ckpt estimate`'s stage-3 offload rows beside zerokit's.
#
# Model size: the full 8B needs 16 bytes per parameter of fp32 master weights, moments and
# gradients on the host, 128 GB, more than the machine's 125 GiB leaves to one process, and
# DeepSpeed needs more (its own estimator: 24 B/param). So the depth is a parameter: LAYERS lists
# the num_hidden_layers to try, largest first (default "12 8": 3.67B and 2.80B parameters, 4096
# hidden, 14336 MLP, 128256 vocab, untied). DeepSpeed runs first, at each depth in turn until one
# runs (a failure for memory moves on to the next; any other failure stops there); zerokit then
# runs at the depth DeepSpeed reached, and the output says which (field "layers", and the table).
# tools/rss_peak.py ends a contender whose host use leaves less than MIN_AVAIL_GIB (4) available,
# before the kernel's OOM killer would pick a process of its own.
#
# Run on the GPU machine from the repo root, with .carry/bin/{train,ckpt}, DeepSpeed's sdist and
# wheels in .carry/whl (../shared/GPU.md) and transformers' wheels in .carry/whl-hf
# (tools/carry_hf_wheels.sh) unless the machine has transformers:
#   COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_offload.sh
# Settings: PRESET (llama-3.1-8b), LAYERS ("12 8"), BATCH (4), SEQ (2048), WARMUP (2), STEPS (4),
# ZK_PARAM (1: also zerokit with offload_param when 120 s are left), ZK_BIG (24: zerokit alone
# at a depth beyond DeepSpeed's host memory, when 120 s are left; empty: not), ZK_BIG_DTYPE (bf16;
# fp32 makes a model that does not fit on the GPU without offload, 20 B/param there, but does
# with it), ZK_BIG_PLAIN (0; 1: the ZK_BIG model also without offload, stage 0, to show it does
# not fit), SKIP_DS (0; 1: no DeepSpeed, zerokit at the first of LAYERS), SKIP_MAIN (0; 1: only
# the ZK_BIG runs), DS_TIMEOUT (200 s) and
# ZK_TIMEOUT (150 s) per run, BUDGET (the seconds all runs must end in: 520; DeepSpeed's runs leave
# ZK_TIMEOUT of it to zerokit), MIN_AVAIL_GIB (4).
# Time on one H200, estimated per phase: DeepSpeed and transformers installed from the carried
# wheels 60-90 s; DeepSpeedCPUAdam's cpu_adam op built once with the machine's gcc and ninja
# (under timeout 200) 60-90 s; DeepSpeed at 12 layers 120-150 s (zero.Init, pinned host buffers,
# 6 steps of 4-6 s; cut at DS_TIMEOUT); zerokit stage 3 + offload_optimizer 60-90 s; zerokit +
# offload_param 60-90 s if time is left. About 6-8 min; every run's timeout is cut to what is left
# of BUDGET, so the whole stays under 9 minutes.
# Writes to $OUT/<date>-offload/ (bench/results/<date>-offload/ without OUT): deepspeed-zero3.json,
# zerokit-offload-optimizer.json, zerokit-offload-param.json, estimate.json, config.json, table.md
# and all.jsonl.
set -uo pipefail
PRESET=${PRESET:-llama-3.1-8b}
LAYERS=${LAYERS:-12 8}
BATCH=${BATCH:-4}
SEQ=${SEQ:-2048}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-4}
ZK_PARAM=${ZK_PARAM:-1}
ZK_BIG_DTYPE=${ZK_BIG_DTYPE:-bf16}
ZK_BIG_PLAIN=${ZK_BIG_PLAIN:-0}
SKIP_DS=${SKIP_DS:-0}
SKIP_MAIN=${SKIP_MAIN:-0}
DS_TIMEOUT=${DS_TIMEOUT:-200}
ZK_TIMEOUT=${ZK_TIMEOUT:-150}
BUDGET=${BUDGET:-520}
MIN_AVAIL_GIB=${MIN_AVAIL_GIB:-4}
# cpu: a smoke test of this script (PRESET=llama-tiny, DS_ACCELERATOR=cpu, a fake nvidia-smi).
DEV=${DEV:-cuda}
DATE=$(date -u +%Y-%m-%d)
OUTDIR=${OUT:-bench/results}/$DATE-offload
mkdir -p "$OUTDIR"
source bench/gpu_env.sh
log() { echo "[gpu_offload $(date -u +%H:%M:%S)] $*" >&2; }
# limit RESERVE CAP: a run's time limit: CAP, or what is left of BUDGET less RESERVE seconds if
# that is less; 0 when under 30 s are left.
limit() { local left=$((BUDGET - SECONDS - $1)); [ $left -lt "$2" ] || left=$2; [ $left -ge 30 ] || left=0; echo $left; }
BENCH_COMMAND="DEV=$DEV PRESET=$PRESET LAYERS=\"$LAYERS\" BATCH=$BATCH SEQ=$SEQ WARMUP=$WARMUP STEPS=$STEPS ZK_PARAM=$ZK_PARAM ZK_BIG=${ZK_BIG-24} ZK_BIG_DTYPE=$ZK_BIG_DTYPE ZK_BIG_PLAIN=$ZK_BIG_PLAIN SKIP_DS=$SKIP_DS SKIP_MAIN=$SKIP_MAIN DS_TIMEOUT=$DS_TIMEOUT ZK_TIMEOUT=$ZK_TIMEOUT BUDGET=$BUDGET bash bench/gpu_offload.sh"
DEVICE="$(nvidia-smi -L | wc -l)x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($(hostname)), $(awk '/MemTotal/{printf "%.0f GiB", $2/2^20}' /proc/meminfo) host memory, $(nproc) cores"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
work=$(mktemp -d)
random_tokens "$work/data"

log "installing DeepSpeed (.carry/whl) and transformers (.carry/whl-hf)"
[ "$SKIP_DS" = 1 ] || install_deepspeed
install_hf || exit 1
log "done ($SECONDS s)"
# DeepSpeedCPUAdam's op, JIT-built once here so that no timed run pays for it (its build folder
# is shared through TORCH_EXTENSIONS_DIR). A fresh folder: a build killed earlier leaves a lock
# file that makes every later build wait for ever.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$work/torch_extensions}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
fi
log "building DeepSpeed's cpu_adam op"
[ "$SKIP_DS" = 1 ] && LAYERS=${LAYERS%% *}
[ "$SKIP_DS" = 1 ] || timeout -k 10 200 python3 -c 'from deepspeed.accelerator import get_accelerator as g; g().create_op_builder("CPUAdamBuilder").load()' \
  > "$work/cpu_adam.log" 2>&1
CPU_ADAM_RC=$?; [ "$SKIP_DS" = 1 ] && CPU_ADAM_RC=0
[ $CPU_ADAM_RC -eq 0 ] || { log "cpu_adam build failed (exit $CPU_ADAM_RC):"; tail -20 "$work/cpu_adam.log" >&2; }
log "done ($SECONDS s)"

# shape N [DTYPE]: the config.json of PRESET at N layers (zerokit's own shape, Llama 3's
# vocabulary) in $work/config-N.json, and its estimate in DTYPE (bf16) with activation
# checkpointing in $work/estimate-N.json.
shape() {
  local cfg="$work/config-$1.json"
  .carry/bin/ckpt estimate --model "$PRESET" --n-layer "$1" --vocab-size 128256 --json > "$work/shape-$1.json" &&
    python3 tools/bench_llama_peer.py --write-config "$cfg" --estimate "$work/shape-$1.json" &&
    .carry/bin/ckpt estimate --model "$cfg" --dtype "${2:-bf16}" --micro-batch "$BATCH" --seq-len "$SEQ" \
      --activation-checkpointing --gpu-memory 140GiB --no-async-save --json > "$work/estimate-$1.json"
}

# run NAME LAYERS LIMIT CMD...: CMD under timeout LIMIT (0: skipped), nvidia-smi's and rss_peak's sampling; the contender's
# JSON line in $OUTDIR/NAME.json (with "layers" and the host figures merged in). OUTFILE is
# $work/NAME.out, or zerokit's metrics.jsonl when NAME starts with zerokit.
run() {
  local name=$1 layers=$2 t=$3; shift 3
  local out="$work/$name.out"; [[ $name == zerokit* ]] && out="$work/$name/metrics.jsonl"
  if [ "$t" -eq 0 ]; then
    RC=124; PEAK=0; echo "skipped: under 30 s of the ${BUDGET}-s budget left" > "$work/$name.err"
  else
    log "$name, $layers layers (timeout $t s)"
    with_peak timeout -k 10 "$t" python3 tools/rss_peak.py --out "$work/$name.rss.json" \
      --min-available-gib "$MIN_AVAIL_GIB" -- "$@" > "$work/$name.out.log" 2> "$work/$name.err"
  fi
  [[ $name == zerokit* ]] || cp "$work/$name.out.log" "$out"
  echo "{\"layers\": $layers}" > "$work/$name.layers.json"
  python3 tools/bench_record.py "$name" "$PRESET-${layers}l" "${DTYPE:-bf16}" "$BATCH" "$out" "$work/$name.err" "$*" \
    "$RC" "$PEAK" "$WARMUP" "$STEPS" "$SEQ" "$DEVICE" "$DATE" "$COMMIT" "$BENCH_COMMAND" \
    "$work/$name.layers.json" "$work/$name.rss.json" > "$OUTDIR/$name.json"
  cat "$OUTDIR/$name.json"
  tail -3 "$work/$name.err" >&2
}

# DeepSpeed first, largest depth first.
ran=
for n in $LAYERS; do
  [ "$SKIP_DS" = 1 ] && break
  shape "$n" || { log "no config for $n layers"; continue; }
  if [ $CPU_ADAM_RC -ne 0 ]; then  # DeepSpeed would wait on the failed build's lock: not run
    printf '{"peer": "deepspeed-zero3", "model": "%s", "layers": %s, "exit": %s, "error": "cpu_adam op build failed: %s"}\n' \
      "$PRESET-${n}l" "$n" "$CPU_ADAM_RC" "$(tail -2 "$work/cpu_adam.log" | tr -d '"\\' | tr '\n' ' ' | cut -c1-300)" \
      > "$OUTDIR/deepspeed-zero3.json"
    break
  fi
  run deepspeed-zero3 "$n" "$(limit "$ZK_TIMEOUT" "$DS_TIMEOUT")" python3 tools/bench_zero3_peer.py --config "$work/config-$n.json" --name "$PRESET-${n}l" \
    --dtype bf16 --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" --data "$work/data" --device "$DEV"
  cp "$OUTDIR/deepspeed-zero3.json" "$OUTDIR/deepspeed-zero3-${n}l.json"
  if python3 -c 'import json,sys; sys.exit(0 if "tokens_per_s" in json.load(open(sys.argv[1])) else 1)' "$OUTDIR/deepspeed-zero3.json"; then
    ran=$n; break
  fi
  # Only a failure for memory makes a smaller model worth its minutes.
  python3 - "$OUTDIR/deepspeed-zero3.json" <<'PY' || break
import json, sys
d = json.load(open(sys.argv[1]))
text = (d.get("error") or "").lower()
sys.exit(0 if d.get("killed_for_memory") or d.get("exit") == 137 or "memory" in text or "alloc" in text else 1)
PY
  log "DeepSpeed did not fit at $n layers: trying the next depth"
done
zl=${ran:-${LAYERS%% *}}
[ -f "$work/config-$zl.json" ] || shape "$zl"
cp "$work/config-$zl.json" "$OUTDIR/config.json"

zk() {  # zk NAME MORE_SETTINGS... (in DTYPE, bf16 unless set)
  local name=$1; shift
  run "$name" "$zl" "$(limit 0 "$ZK_TIMEOUT")" .carry/bin/train --set model="$work/config-$zl.json" --set block_size="$SEQ" \
    --set batch_size="$BATCH" --set max_iters=$((STEPS + WARMUP)) --set eval_iters=0 --set log_interval=1 \
    --set dtype="${DTYPE:-bf16}" --set device="$DEV" --set sample_tokens=0 --set dataset="$work/data" \
    --set out_dir="$work/$name" --set warmup_iters=0 --set zero_stage=3 --set offload_optimizer=true \
    --set activation_checkpointing=true --set pin_memory=true "$@"
}
# Each zerokit run's estimate: NAME ESTIMATE-FILE OFFLOAD lines for the comparison below.
pairs="$work/pairs"; : > "$pairs"
if [ "$SKIP_MAIN" != 1 ]; then
  zk zerokit-offload-optimizer
  echo "zerokit-offload-optimizer $work/estimate-$zl.json optimizer" >> "$pairs"
  if [ "$ZK_PARAM" = 1 ] && [ $((BUDGET - SECONDS)) -ge 120 ]; then
    zk zerokit-offload-param --set offload_param=true
    echo "zerokit-offload-param $work/estimate-$zl.json optimizer_and_params" >> "$pairs"
  fi
fi
# A depth DeepSpeed's host memory cannot hold (its estimator: 24 B/param with optimizer offload)
# and zerokit's 16 B/param can: zerokit alone, when time is left (ZK_BIG, default 24 layers).
ZK_BIG=${ZK_BIG-24}
if [ -n "$ZK_BIG" ] && [ "$ZK_BIG" != "$zl" ] && [ $((BUDGET - SECONDS)) -ge 120 ] && shape "$ZK_BIG" "$ZK_BIG_DTYPE"; then
  zl_main=$zl; zl=$ZK_BIG
  big="zerokit-offload-optimizer-${ZK_BIG}l"; [ "$ZK_BIG_DTYPE" = bf16 ] || big="$big-$ZK_BIG_DTYPE"
  DTYPE=$ZK_BIG_DTYPE zk "$big"
  echo "$big $work/estimate-$ZK_BIG.json optimizer" >> "$pairs"
  # The same model without offload (stage 0, the least a single GPU can hold without it): the
  # estimate says whether it fits, and the run shows what happens.
  if [ "$ZK_BIG_PLAIN" = 1 ] && [ $((BUDGET - SECONDS)) -ge 60 ]; then
    DTYPE=$ZK_BIG_DTYPE zk "zerokit-no-offload-${ZK_BIG}l-$ZK_BIG_DTYPE" --set zero_stage=0 --set offload_optimizer=false
    echo "zerokit-no-offload-${ZK_BIG}l-$ZK_BIG_DTYPE $work/estimate-$ZK_BIG.json none:0" >> "$pairs"
  fi
  cp "$work/estimate-$ZK_BIG.json" "$OUTDIR/estimate-${ZK_BIG}l.json"
  cp "$work/config-$ZK_BIG.json" "$OUTDIR/config-${ZK_BIG}l.json"
  zl=$zl_main
fi

# ckpt estimate's rows (GPU less the CUDA context, host) beside what each zerokit run measured:
# stage 3 with the run's offload, or OFFLOAD:STAGE.
python3 - "$pairs" "$OUTDIR" <<'PY' | tee "$OUTDIR/estimate.json"
import json, os, sys
pairs, outdir = sys.argv[1:]
out = {"rows": []}
for line in open(pairs):
    name, est, offload = line.split()
    offload, _, stage = offload.partition(":")
    e = json.load(open(est))
    out.setdefault("num_params", e["num_params"]); out.setdefault("setup", e["setup"])
    row = next((r for r in e["rows"] if r["stage"] == int(stage or 3) and r["offload"] == offload), None)
    path = os.path.join(outdir, name + ".json")
    if row is None or not os.path.exists(path):
        continue
    zk = json.load(open(path))
    r = {"contender": name, "offload": offload, "stage": int(stage or 3), "num_params": e["num_params"],
         "dtype": e["setup"].get("dtype"), "estimate_gpu_gib": round(row["gpu_total"] / 2**30, 3),
         "fits_140gib": row["gpu_total"] <= 140 * 2**30,
         # The runs save no checkpoint: the rank's peak, without rank 0's save copies.
         "estimate_host_gib": round(max(row["host"]["startup"], row["host"]["optimizer"] + row["host"]["params"]
                                        + row["host"]["checkpoint"]) / 2**30, 3),
         "deepspeed_estimator": {k: round(v / 2**30, 3) for k, v in (row.get("deepspeed") or {}).items()}}
    if zk.get("gpu_mem_peak_gib") is not None and zk.get("gpu_context_gib") is not None:
        g = zk["gpu_mem_peak_gib"] - zk["gpu_context_gib"]
        r.update({"measured_gpu_gib": round(g, 3), "gpu_error": round((r["estimate_gpu_gib"] - g) / g, 4)})
    if zk.get("host_rss_peak_gib"):
        h = zk["host_rss_peak_gib"]
        r.update({"measured_host_rss_gib": h, "host_error": round((r["estimate_host_gib"] - h) / h, 4)})
    out["rows"].append(r)
print(json.dumps(out))
PY

cat "$OUTDIR"/deepspeed-zero3.json "$OUTDIR"/zerokit-*.json > "$OUTDIR/all.jsonl" 2>/dev/null
python3 - "$OUTDIR/all.jsonl" "$OUTDIR/estimate.json" "$BENCH_COMMAND" "$LAYERS" "$zl" <<'PY' | tee "$OUTDIR/table.md"
import json, sys
path, est, command, tried, layers = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
e = json.load(open(est))
f = rows[0] if rows else {}
print(f"{f.get('device', '?')}, {f.get('date', '?')}, commit {f.get('commit', '?')}, command: `{command}`\n")
print(f"Llama-3.1-8B shape, DeepSpeed and zerokit at {layers} layers (tried, largest first: {tried}), "
      f"micro-batch {f.get('batch', '?')}, sequence {f.get('seq', '?')}, activation checkpointing; "
      "the full 32-layer 8B needs 16 B/param of fp32 state on the host, more than this machine holds.\n")
print("| contender | layers | dtype | tokens/s | TFLOPS | step (ms) | GPU peak, nvidia-smi (GiB) | GPU peak, own (GiB) | "
      "host RSS peak (GiB) | host used rise (GiB) | loss after last step |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if "tokens_per_s" not in r:
        print(f"| {r['peer']} | {r.get('layers', '')} | {r.get('dtype', '')} | failed: {str(r.get('error', ''))[:200].replace('|', '/')} | | | "
              f"{r.get('peak_used_gib_nvidia_smi') or 0:.1f} | | {r.get('host_rss_peak_gib', 0):.1f} | | |")
        continue
    own = r.get("peak_allocated_gib") or r.get("gpu_mem_peak_gib")
    tf = r.get("tflops_per_gpu") or (r["mfu"] * 989 if r.get("mfu") else None)
    print(f"| {r['peer']} | {r.get('layers', '')} | {r.get('dtype', '')} | {r['tokens_per_s']:,.0f} | {'' if tf is None else f'{tf:.1f}'} | "
          f"{r['step_ms']:.0f} | {r.get('peak_used_gib_nvidia_smi') or 0:.1f} | {'' if own is None else f'{own:.1f}'} | "
          f"{r.get('host_rss_peak_gib', 0):.1f} | {r.get('host_used_rise_peak_gib', 0):.1f} | {r.get('loss', 0):.4f} |")
ds = next((r for r in rows if r["peer"] == "deepspeed-zero3" and "tokens_per_s" in r), None)
zk = next((r for r in rows if r["peer"] == "zerokit-offload-optimizer" and "tokens_per_s" in r), None)
if ds and zk:
    print(f"\nzerokit (offload_optimizer) against DeepSpeed: {zk['tokens_per_s'] / ds['tokens_per_s']:.2f}x tokens/s, "
          f"host RSS {zk.get('host_rss_peak_gib', 0):.1f} against {ds.get('host_rss_peak_gib', 0):.1f} GiB "
          f"({zk.get('host_rss_peak_gib', 0) * 2**30 / zk.get('params', e.get('num_params', 1)):.1f} against "
          f"{ds.get('host_rss_peak_gib', 0) * 2**30 / ds.get('params', e.get('num_params', 1)):.1f} bytes per parameter).")
for r in e["rows"]:
    print(f"\nckpt estimate, {r['contender']} ({r['num_params'] / 1e9:.2f}B, {r['dtype']}), stage {r['stage']}, offload {r['offload']}: GPU {r['estimate_gpu_gib']:.2f} GiB"
          + (f" (measured {r['measured_gpu_gib']:.2f} less the CUDA context: {100 * r['gpu_error']:+.1f}%)" if "measured_gpu_gib" in r else "")
          + f", host {r['estimate_host_gib']:.2f} GiB"
          + (f" (measured RSS {r['measured_host_rss_gib']:.2f}: {100 * r['host_error']:+.1f}%)" if "measured_host_rss_gib" in r else ""))
PY
log "done in $SECONDS s"
rm -rf "$work"
