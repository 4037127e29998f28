set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s12e; mkdir -p $R
finish() { (cd $OUT && tar czf s12e.tgz s12e && rm -rf s12e); }
trap finish EXIT
mkdir -p /work target/release && ln -sfn "$PWD" /work/main && ln -sf "$PWD/.carry/bin/train" target/release/train
echo "== GPU tests (commit $C)"
timeout 150 .carry/tests/kernels widen linear layer_norm activated_linear deterministic --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
grep -hE '^test |test result|panicked' $R/kernels-gpu-tests.txt | tail -12
for run in gpt2:bf16:16 gpt2-xl:bf16:8; do
  echo "== A/B $run: $C against b879d2c, with torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS="train train-b879d2c" PEERS="zerokit compile" TIMEOUT=170 STEPS=12 WARMUP=4 bash bench/gpu_single.sh $run >> $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | grep -E "^\|" | tail -3
done
echo "== done $SECONDS s"
