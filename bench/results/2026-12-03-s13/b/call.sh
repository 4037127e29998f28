set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s13b; mkdir -p $R
finish() { (cd $OUT && tar czf s13b.tgz s13b && rm -rf s13b); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
echo "== GPU tests (commit $C)"
timeout 100 .carry/tests/kernels adamw gradient_sum --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -6
grep -hE 'step 3' $R/kernels-gpu-tests.txt | head -10 | cut -c1-220
timeout 100 .carry/tests/engine zerokit_adamw --ignored --nocapture > $R/engine-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked|bitwise' $R/engine-gpu-tests.txt | sed 's/losses.*(bitwise/(bitwise/' | tail -16
for run in gpt2-xl:bf16:8 gpt2:bf16:16 gpt2-xl:fp16:8; do
  echo "== $run: $C with torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -2
done
echo "== estimate against train ($SECONDS s)"
OUT=$R MODELS="gpt2-xl gpt2" STAGES="0" BATCHES="8 1" CKPTS="false true" STEPS=4 timeout 200 bash bench/gpu_estimate.sh > $R/estimate.log 2>&1
cut -c1-200 $R/estimate.jsonl
echo "== done $SECONDS s"
