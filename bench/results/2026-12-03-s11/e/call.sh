set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit); work=$(mktemp -d); export work
R=$OUT/s11e; mkdir -p $R
finish() { (cd $OUT && tar czf s11e.tgz s11e && rm -rf s11e); }
trap finish EXIT
echo "== GPU tests (commit $C)"
timeout 60 .carry/tests/kv_cache cached_sampling_in_bf16_on_cuda --ignored --test-threads 1 --nocapture > $R/kv-cache-bf16.txt 2>&1
timeout 60 .carry/tests/optim grad_norm_of_more --ignored --test-threads 1 --nocapture > $R/optim-gpu.txt 2>&1
grep -hE '^test |test result|panicked|bf16, CUDA' $R/kv-cache-bf16.txt $R/optim-gpu.txt | cut -c1-300 | tail -8
echo "== decoder estimates ($SECONDS s)"
COMMIT=$C OUT=$R BUDGET=330 RUNS="gemma2-2b:gemma-2-2b:bf16:4:1024:false gemma2-2b-ckpt:gemma-2-2b:bf16:4:1024:true mistral-8l:MISTRAL:bf16:4:1024:false gemma3-8l-ckpt:GEMMA3:bf16:2:2048:true" \
  bash bench/gpu_models.sh 2>&1 | tee $R/models.txt | cut -c1-250
python3 -c "
import json
for l in open('$R/models.jsonl'):
    d=json.loads(l); print(d['run'], 'rc', d['rc'], 'params', d['num_params'], 'measured', d.get('measured_gib'), 'estimate', d.get('estimate_gib'), 'error', d.get('error'), 'tok/s', d.get('tokens_per_s'))"
grep -h -i -E "^error|panicked" $R/logs/*.log | cut -c1-400 | head -6
if [ $SECONDS -lt 390 ]; then
  echo "== issue 13: GPT-2 124M against torch.compile ($SECONDS s)"
  COMMIT=$C OUT=$R ZK_BINS=train PEERS="zerokit compile" TIMEOUT=100 bash bench/gpu_single.sh gpt2:bf16:16 > $R/single.txt 2>&1
  cat $R/single.md 2>/dev/null | tail -4
fi
echo "== done $SECONDS s"
