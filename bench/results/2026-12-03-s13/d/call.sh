set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s13d; mkdir -p $R
finish() { (cd $OUT && tar czf s13d.tgz s13d && rm -rf s13d); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
echo "== GPU tests (commit $C)"
timeout 150 .carry/tests/kernels adamw gradient_sum deterministic --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -6
grep -hE 'step 3' $R/kernels-gpu-tests.txt | grep -vc 'differing params 0 (rel 0e0), exp_avg 0 (0e0), exp_avg_sq 0 (0e0)'
timeout 100 .carry/tests/engine zerokit_adamw --ignored --nocapture > $R/engine-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked|bitwise' $R/engine-gpu-tests.txt | sed 's/losses.*(bitwise/(bitwise/' | tail -14
for run in gpt2:bf16:16 gpt2-xl:bf16:8; do
  echo "== A/B $run: $C against 0ca56c9, with torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train train-0ca56c9" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -3
done
work=$(mktemp -d); random_tokens "$work/data"
for run in gpt2-xl:bf16:8; do
  IFS=: read -r model dtype batch <<< "$run"
  dir=$work/$model
  echo "== profile $run ($SECONDS s)"
  timeout 120 .carry/bin/train --profile --set model=$model --set block_size=1024 --set vocab_size=50304 \
    --set batch_size=$batch --set max_iters=14 --set eval_iters=0 --set log_interval=7 \
    --set dtype=$dtype --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
    --set out_dir="$dir" --set warmup_iters=0 > $R/profile-$model.log 2>&1
  grep -h 'profile at step 14' "$dir/logs/rank000.log" | tee -a $R/profile.txt | cut -c60-400
  for t in "$dir"/logs/trace_*.json; do [ -f "$t" ] && python3 tools/trace_summary.py "$t" --top 40 --gaps 30 > $R/trace-$model-$dtype.txt; done
  head -1 $R/trace-$model-$dtype.txt
  sed -n '/idle gaps/,$p' $R/trace-$model-$dtype.txt | head -20 | cut -c1-160
done
echo "== done $SECONDS s"
