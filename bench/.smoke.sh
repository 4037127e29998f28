set -uo pipefail
source bench/gpu_env.sh
OUTDIR=$OUT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2; nproc
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
for t in engine kernels; do
  timeout 150 .carry/tests/$t --ignored --test-threads 1 --nocapture 2>&1 | tee $OUTDIR/$t.txt | grep -E '^test |test result|panicked|losses' | head -20
done
random_tokens /tmp/data
for mode in "zero_stage=0" "zero_stage=3 offload_optimizer=true" "zero_stage=3 offload_optimizer=true offload_param=true"; do
  sets=""; for kv in $mode; do sets="$sets --set $kv"; done
  echo "== llama-3.2-1b $mode"
  /usr/bin/time -v timeout 100 .carry/bin/train --set model=llama-3.2-1b --set dataset=/tmp/data --set out_dir=/tmp/o --set dtype=bf16 \
    --set batch_size=4 --set block_size=2048 --set max_iters=12 --set eval_iters=0 --set log_interval=2 --set sample_tokens=0 \
    --set activation_checkpointing=true --set warmup_iters=2 $sets > $OUTDIR/run.txt 2>&1
  grep -E "iter|error|Error|panick|Maximum resident|Elapsed" $OUTDIR/run.txt | tail -6
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
done
