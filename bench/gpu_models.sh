#!/usr/bin/env bash
# `ckpt estimate` against `train`'s measured peak on one GPU for the decoder families (issue 15):
# Gemma 2 (gemma-2-2b), a Gemma 3 shape (gemma-3-27b's layers, fewer of them), Qwen2
# (qwen2.5-0.5b, q/k/v biases) and a Mistral shape (mistral-7b's layers, fewer, with a window
# shorter than the sequence, so that the sliding-window mask is in play), each with and without
# activation checkpointing where it fits. Run on the GPU machine with .carry/bin/{train,ckpt}:
#
#     COMMIT=$(git rev-parse --short HEAD) OUT=DIR bash bench/gpu_models.sh
#
# Writes DIR/models.jsonl (one line a run: the command, the estimate's rows, the measured peak,
# tokens/s, the error) and prints one line a run. RUNS picks runs by name; BUDGET (s) stops
# starting runs after that many seconds.
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:?set OUT}; COMMIT=${COMMIT:-unknown}; BUDGET=${BUDGET:-400}
work=$(mktemp -d); export work
random_tokens "$work/data"

# A transformers config.json from a preset's shape (`ckpt estimate --json`'s setup.model) with
# some keys replaced (python literals), so that train, the estimate and transformers read one file.
shape() {
  local preset=$1 out=$2; shift 2
  .carry/bin/ckpt estimate --model "$preset" --json > "$work/shape.json"
  python3 - "$work/shape.json" "$out" "$@" <<'PY'
import ast, json, sys
src, out, *kv = sys.argv[1:]
m = {k: v for k, v in json.load(open(src))["setup"]["model"].items() if k != "family" and v is not None}
for item in kv:
    k, v = item.split("=", 1)
    m[k] = ast.literal_eval(v)
n = m["num_hidden_layers"]
if isinstance(m.get("layer_types"), list):
    m["layer_types"] = m["layer_types"][:n]
json.dump(m, open(out, "w"), indent=1)
PY
}

shape gemma-3-27b "$work/gemma3-8l.json" num_hidden_layers=8 sliding_window=512
shape mistral-7b "$work/mistral-8l.json" num_hidden_layers=8 sliding_window=512

# name model dtype micro-batch sequence checkpointing
# (GEMMA3 and MISTRAL name the two shapes above.)
RUNS=${RUNS:-"gemma2-2b:gemma-2-2b:bf16:4:1024:false gemma2-2b-ckpt:gemma-2-2b:bf16:4:1024:true
  gemma3-8l-ckpt:GEMMA3:bf16:2:2048:true qwen2.5-0.5b:qwen2.5-0.5b:bf16:8:1024:false
  mistral-8l:MISTRAL:bf16:4:1024:false mistral-8l-ckpt:MISTRAL:bf16:4:1024:true"}
for spec in $RUNS; do
  IFS=: read -r name model dtype mb T ck <<< "$spec"
  case $model in GEMMA3) model=$work/gemma3-8l.json ;; MISTRAL) model=$work/mistral-8l.json ;; esac
  # GPT-2's token ids, or below a smaller vocabulary (Mistral's 32000).
  vocab=$(.carry/bin/ckpt estimate --model "$model" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["setup"]["model"]["vocab_size"])')
  data=$work/data; if [ "$vocab" -lt 50257 ]; then data=$work/data-$vocab; [ -d "$data" ] || random_tokens "$data" "$vocab"; fi
  [ "$SECONDS" -lt "$BUDGET" ] || { echo "$name: skipped (budget)"; continue; }
  cmd=(.carry/bin/train --set model=$model --set block_size=$T --set batch_size=$mb --set max_iters=5 --set eval_iters=0
    --set log_interval=1 --set dtype=$dtype --set device=cuda --set zero_stage=0 --set sample_tokens=0
    --set dataset=$data --set out_dir=$work/$name --set warmup_iters=0 --set activation_checkpointing=$ck)
  with_peak timeout 90 "${cmd[@]}" > "$work/$name.log" 2>&1
  mkdir -p "$OUT/logs"; grep -v '^frame #' "$work/$name.log" | cut -c1-2000 > "$OUT/logs/$name.log"
  ck_flag=; [ "$ck" = true ] && ck_flag=--activation-checkpointing
  # train's gradient bucket: its largest parameter group (the embedding), the estimate's --bucket-elems.
  largest=$(.carry/bin/ckpt estimate --model "$model" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["largest_layer_params"])')
  .carry/bin/ckpt estimate --model "$model" --dtype "$dtype" --micro-batch "$mb" --seq-len "$T" $ck_flag \
    --bucket-elems "$largest" --gpu-memory 140GiB --json > "$work/$name.est.json"
  python3 - "$work/$name/metrics.jsonl" "$work/$name.est.json" "$name" "$PEAK" "$RC" "${cmd[*]}" "$COMMIT" \
    "$work/$name.log" <<'PY' | tee -a "$OUT/models.jsonl" | cut -c1-400
import json, sys
met, est, name, peak, rc, cmd, commit, log = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(met) if l.strip()]
except OSError:
    rows = []
steps = [r for r in rows if r.get("gpu_mem_gib") is not None]
ctx = next((r["gpu_context_gib"] for r in rows if r.get("gpu_context_gib") is not None), None)
e = json.load(open(est))
row = next(r for r in e["rows"] if r["stage"] == 0 and r["offload"] == "none")
out = {"run": name, "rc": int(rc), "commit": commit, "command": cmd, "num_params": e["num_params"],
       "nvidia_smi_peak_gib": float(peak), "estimate_gib": round(row["gpu_total"] / 2**30, 3),
       "rows_gib": {k: round(v / 2**30, 3) for k, v in row["gpu"].items()}}
if steps and ctx is not None:
    m = max(r["gpu_mem_gib"] for r in steps) - ctx
    out.update({"measured_gib": round(m, 3), "context_gib": round(ctx, 3),
                "error": round((out["estimate_gib"] - m) / m, 4), "tokens_per_s": steps[-1].get("tokens_per_s"),
                "losses": [r.get("loss") for r in steps]})
else:
    out["log_tail"] = open(log, errors="replace").read()[-600:]
print(json.dumps(out))
PY
done
echo "== gpu_models done ($SECONDS s)"
