#!/usr/bin/env bash
# `train sample` tokens/s on CPU with and without the key/value cache (issue 15), on three
# random-weight Hugging Face directories made by transformers (no tokenizer.json: GPT-2's BPE):
# gpt2-6l (6 layers, 6 heads, 384 wide, 1024 positions, GPT-2's vocabulary: nanoGPT's "baby GPT"
# with BPE), and llama-tiny and gemma-tiny (the presets' shapes, 1024 positions; gemma-tiny's
# local layers have a window of 64). From the repo root, after `cargo build --release --bins`:
#   BEFORE=/path/to/train-of-an-earlier-build bash bench/cpu_sample.sh
# Each line: model, binary, flags, tokens, the best wall time of RUNS runs (startup included),
# and tokens/s = tokens / (that time - the best time of a 0-token run). Timings on a shared
# machine are noisy: the best of a few runs is the figure.
set -euo pipefail
PY=${PY:-.deps/py/bin/python}
DIR=${DIR:-/tmp/zk-sample-bench}
RUNS=${RUNS:-3}
NEW=${NEW:-target/release/train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
mkdir -p "$DIR"
[ -d "$DIR/gemma-tiny" ] || "$PY" - "$DIR" <<'PYEOF'
import sys, torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
torch.manual_seed(0)
out = sys.argv[1]
GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=1024, vocab_size=50257)).save_pretrained(
    f"{out}/gpt2-6l")
LlamaForCausalLM(LlamaConfig(vocab_size=50304, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                             tie_word_embeddings=True)).save_pretrained(f"{out}/llama-tiny")
AutoModelForCausalLM.from_config(Gemma3TextConfig(
    vocab_size=50304, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, sliding_window_pattern=2,
    max_position_embeddings=1024)).save_pretrained(f"{out}/gemma-tiny")
PYEOF
best() {  # best wall time of RUNS runs of `$@`
  local b=""
  for _ in $(seq "$RUNS"); do
    local s e t
    s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc)
    if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
  done
  echo "$b"
}
for spec in ${MODELS:-gpt2-6l:200 llama-tiny:1000 gemma-tiny:1000}; do
  m=${spec%%:*}; n=${spec#*:}
  for variant in ${BEFORE:+"$BEFORE|"} "$NEW|--no-kv-cache" "$NEW|"; do
    bin=${variant%%|*}; flags=${variant#*|}
    run() { "$bin" sample "$DIR/$m" --prompt Hello --device cpu $flags --tokens "$@"; }
    t0=$(best run 0); tn=$(best run "$n")
    echo "$m $bin '${flags}' tokens=$n best=${tn}s startup=${t0}s tokens/s=$(echo "scale=1; $n / ($tn - $t0)" | bc)"
  done
done
