#!/usr/bin/env bash
# zero-to-fp32 against DeepSpeed's zero_to_fp32.py (issue 6) on a GPU machine's local disk and
# cores (no GPU is used): a synthetic GPT-2 XL ZeRO-2 fp16 checkpoint of 4 ranks (21.8 GB,
# tools/make_xl_deepspeed_ckpt.py, in the structure DeepSpeed itself saves), then
# tools/bench_zero_to_fp32.py times both tools on it in one run.
# Usage, from the repo root with the binaries in .carry/bin and the wheels in .carry/whl:
#   bash bench/gpu_zero_to_fp32.sh
# Writes JSON lines to $OUT/zero_to_fp32.jsonl (or bench/results/zero_to_fp32.jsonl).
set -uo pipefail
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
source bench/gpu_env.sh
install_deepspeed
work=$(mktemp -d -p "${WORK:-/tmp}")
df -h "$work" | tail -1
t0=$(date +%s)
python3 tools/make_xl_deepspeed_ckpt.py "$work/xl" > /dev/null || exit 1
echo "checkpoint written in $(( $(date +%s) - t0 )) s"
python3 tools/bench_zero_to_fp32.py "$work/xl" --bin .carry/bin/zero-to-fp32 --out "$work/out" \
  | tee -a "$OUTDIR/zero_to_fp32.jsonl"
rm -rf "$work"
