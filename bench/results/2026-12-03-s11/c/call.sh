set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit); work=$(mktemp -d); export work
R=$OUT/s11c; mkdir -p $R
finish() { (cd $OUT && tar czf s11c.tgz s11c && rm -rf s11c); }
trap finish EXIT
echo "== GPU tests (commit $C)"
timeout 50 .carry/tests/kernels rms_norm activated_linear --ignored --test-threads 1 --nocapture > $R/kernels-gpu-tests.txt 2>&1
timeout 60 .carry/tests/kv_cache cached_sampling_in_bf16_on_cuda --ignored --test-threads 1 --nocapture > $R/kv-cache-bf16.txt 2>&1
grep -hE '^test |test result|panicked|bf16, CUDA' $R/kernels-gpu-tests.txt $R/kv-cache-bf16.txt | tail -12
echo "== issue 16: fp32, 28 layers of the 8B shape, stage 0 without offload ($SECONDS s)"
random_tokens $work/data
.carry/bin/ckpt estimate --model llama-3.1-8b --n-layer 28 --vocab-size 128256 --json > $work/shape.json
python3 tools/bench_llama_peer.py --write-config $R/config-28l.json --estimate $work/shape.json
.carry/bin/ckpt estimate --model $R/config-28l.json --dtype fp32 --micro-batch 4 --seq-len 2048 --activation-checkpointing \
  --gpu-memory 140GiB --no-async-save --stage 0 > $R/plain-fp32-28l-estimate.txt 2>&1
cmd=(.carry/bin/train --set model=$R/config-28l.json --set block_size=2048 --set batch_size=4 --set max_iters=3
  --set eval_iters=0 --set log_interval=1 --set dtype=fp32 --set device=cuda --set sample_tokens=0 --set dataset=$work/data
  --set out_dir=$work/plain --set warmup_iters=0 --set zero_stage=0 --set activation_checkpointing=true)
echo "${cmd[*]}" > $R/plain-fp32-28l.log
with_peak timeout 120 "${cmd[@]}" >> $R/plain-fp32-28l.log 2>&1
echo "exit $RC, nvidia-smi peak $PEAK GiB, $SECONDS s" >> $R/plain-fp32-28l.log
tail -4 $R/plain-fp32-28l.log | cut -c1-500
echo "== issue 15: gemma-2-2b against the estimate ($SECONDS s)"
COMMIT=$C OUT=$R BUDGET=200 RUNS="gemma2-2b:gemma-2-2b:bf16:4:1024:false gemma2-2b-ckpt:gemma-2-2b:bf16:4:1024:true" \
  bash bench/gpu_models.sh 2>&1 | tee $R/models.txt | cut -c1-400
echo "== issue 13: GPT-2 XL against torch.compile ($SECONDS s)"
COMMIT=$C OUT=$R ZK_BINS=train PEERS="zerokit compile" TIMEOUT=170 bash bench/gpu_single.sh gpt2-xl:bf16:8 > $R/single.txt 2>&1
cat $R/single.md 2>/dev/null
if [ $SECONDS -lt 400 ]; then
  COMMIT=$C OUT=$R ZK_BINS=train PEERS="zerokit compile" TIMEOUT=170 bash bench/gpu_single.sh gpt2-xl:fp16:8 >> $R/single.txt 2>&1
  tail -4 $R/single.md 2>/dev/null
fi
if [ $SECONDS -lt 470 ]; then
  echo "== more decoder estimates ($SECONDS s)"
  COMMIT=$C OUT=$R BUDGET=$((560 - SECONDS)) RUNS="qwen2.5-0.5b:qwen2.5-0.5b:bf16:8:1024:false" bash bench/gpu_models.sh 2>&1 | tee -a $R/models.txt | cut -c1-400
fi
echo "== done $SECONDS s"
