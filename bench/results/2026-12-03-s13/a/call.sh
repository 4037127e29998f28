set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s13a; mkdir -p $R
finish() { (cd $OUT && tar czf s13a.tgz s13a && rm -rf s13a); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
echo "== GPU tests (commit $C)"
timeout 150 .carry/tests/kernels widen linear layer_norm classifier_kernel head_backward adamw gradient_sum deterministic --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -14
grep -hE 'step 3|sum of squares' $R/kernels-gpu-tests.txt | head -14 | cut -c1-200
timeout 100 .carry/tests/engine zerokit_adamw --ignored --nocapture > $R/engine-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked|bitwise' $R/engine-gpu-tests.txt | tail -16 | cut -c1-220
for run in gpt2-xl:bf16:8 gpt2:bf16:16; do
  echo "== A/B $run: $C against f5735f1, with torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train train-f5735f1" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -3
done
if [ $SECONDS -lt 400 ]; then
  echo "== profile of the new build, XL bf16 ($SECONDS s)"
  work=$(mktemp -d); random_tokens "$work/data"; dir=$work/p
  timeout 100 .carry/bin/train --profile --set model=gpt2-xl --set block_size=1024 --set vocab_size=50304 \
    --set batch_size=8 --set max_iters=14 --set eval_iters=0 --set log_interval=7 \
    --set dtype=bf16 --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
    --set out_dir="$dir" --set warmup_iters=0 > $R/profile-xl.log 2>&1
  grep -h 'profile at step 14' "$dir/logs/rank000.log" | tee $R/profile.txt
  for t in "$dir"/logs/trace_*.json; do [ -f "$t" ] && python3 tools/trace_summary.py "$t" --top 50 > $R/trace-xl-bf16.txt; done
  head -24 $R/trace-xl-bf16.txt | cut -c1-150
fi
if [ $SECONDS -lt 420 ]; then
  run=gpt2-xl:fp16:8
  echo "== A/B $run ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train train-f5735f1" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -3
fi
echo "== done $SECONDS s"
