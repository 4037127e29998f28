set -uo pipefail
source bench/gpu_env.sh
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
timeout 120 .carry/tests/engine --ignored --test-threads 1 --nocapture 2>&1 | tee $OUT/engine.txt | grep -E '^test |test result|panicked' | head
random_tokens /tmp/data
for mode in "zero_stage=3 offload_optimizer=true"; do
  sets=""; for kv in $mode; do sets="$sets --set $kv"; done
  echo "== llama-3.2-1b $mode"
  timeout 100 .carry/bin/train --set model=llama-3.2-1b --set dataset=/tmp/data --set out_dir=/tmp/o --set dtype=bf16 \
    --set batch_size=4 --set block_size=2048 --set max_iters=12 --set eval_iters=0 --set log_interval=2 --set sample_tokens=0 \
    --set activation_checkpointing=true --set warmup_iters=2 --profile $sets > $OUT/run.txt 2>&1
  grep -E "iter 1[02]|error|Error|panick|host memory|phase|adamw|norm " $OUT/run.txt | tail -12
done
BUDGET=420 COMMIT=$(cat .commit) OUT=$OUT bash bench/gpu_llama.sh 2>&1 | tail -30
