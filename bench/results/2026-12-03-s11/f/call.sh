set -uo pipefail
C=$(cat .carry/commit)
R=$OUT/s11f; mkdir -p $R
finish() { (cd $OUT && tar czf s11f.tgz s11f && rm -rf s11f); }
trap finish EXIT
echo "== issue 13: activated_linear ($C) against the build before it (40a9470), same call"
COMMIT=$C OUT=$R ZK_BINS="train train-40a9470" PEERS="zerokit" TIMEOUT=90 STEPS=10 WARMUP=3 bash bench/gpu_single.sh gpt2:bf16:16 gpt2-xl:bf16:8 > $R/single.txt 2>&1
cat $R/single.md 2>/dev/null | grep -E "^\| zerokit|^gpt2"
echo "== done $SECONDS s"
