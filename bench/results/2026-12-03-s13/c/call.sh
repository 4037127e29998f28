set -uo pipefail
source bench/gpu_env.sh
C=$(cat .carry/commit)
R=$OUT/s13c; mkdir -p $R
finish() { (cd $OUT && tar czf s13c.tgz s13c && rm -rf s13c); }
trap finish EXIT
work=$(mktemp -d); random_tokens "$work/data"
for run in gpt2-xl:bf16:8 gpt2:bf16:16; do
  IFS=: read -r model dtype batch <<< "$run"
  dir=$work/$model
  echo "== profile $run ($SECONDS s)"
  timeout 120 .carry/bin/train --profile --set model=$model --set block_size=1024 --set vocab_size=50304 \
    --set batch_size=$batch --set max_iters=14 --set eval_iters=0 --set log_interval=7 \
    --set dtype=$dtype --set device=cuda --set sample_tokens=0 --set dataset="$work/data" \
    --set out_dir="$dir" --set warmup_iters=0 > $R/profile-$model.log 2>&1
  grep -h 'profile at step 14' "$dir/logs/rank000.log" | tee -a $R/profile.txt | cut -c60-400
  for t in "$dir"/logs/trace_*.json; do [ -f "$t" ] && python3 tools/trace_summary.py "$t" --top 40 --gaps 40 > $R/trace-$model-$dtype.txt; done
  head -1 $R/trace-$model-$dtype.txt
  sed -n '/idle gaps/,$p' $R/trace-$model-$dtype.txt | head -30 | cut -c1-160
done
echo "== done $SECONDS s"
