set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s13e; mkdir -p $R
finish() { (cd $OUT && tar czf s13e.tgz s13e && rm -rf s13e); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
echo "== GPU tests (commit $C)"
timeout 150 .carry/tests/kernels adamw gradient_sum deterministic --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -6
grep -hE 'step 3' $R/kernels-gpu-tests.txt | grep -vc 'differing params 0 (rel 0e0), exp_avg 0 (0e0), exp_avg_sq 0 (0e0)'
timeout 100 .carry/tests/engine zerokit_adamw --ignored --nocapture > $R/engine-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked|bitwise' $R/engine-gpu-tests.txt | sed 's/losses.*(bitwise/(bitwise/' | tail -14
for run in gpt2:bf16:16 gpt2-xl:bf16:8 gpt2-xl:fp16:8; do
  echo "== A/B $run: $C with torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -3
done
grep -c "pin_memory" $R/single.txt $R/kernels-gpu-tests.txt
echo "== done $SECONDS s"
