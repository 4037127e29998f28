set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s12d; mkdir -p $R
finish() { (cd $OUT && tar czf s12d.tgz s12d && rm -rf s12d); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
timeout 120 .carry/tests/kernels deterministic --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -4
work=$(mktemp -d); random_tokens "$work/data"; dir=$work/p
timeout 100 .carry/bin/train --profile --set model=gpt2 --set block_size=1024 --set vocab_size=50304 \
  --set batch_size=16 --set max_iters=14 --set eval_iters=0 --set log_interval=7 \
  --set dtype=bf16 --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
  --set out_dir="$dir" --set warmup_iters=0 > $R/profile-124m.log 2>&1
grep -h 'profile at step 14' "$dir/logs/rank000.log" | tee $R/profile.txt
for t in "$dir"/logs/trace_*.json; do [ -f "$t" ] && python3 tools/trace_summary.py "$t" --top 50 > $R/trace-124m-bf16.txt; done
head -40 $R/trace-124m-bf16.txt | cut -c1-150
echo "== done $SECONDS s"
