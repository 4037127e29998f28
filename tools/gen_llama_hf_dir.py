#!/usr/bin/env python3
"""A transformers-saved Llama directory for tests/llama_train.rs's round trip (a Hugging Face
directory loaded into `train`, trained, converted with zero-to-fp32 and loaded back into
transformers): a tiny LlamaForCausalLM with the vocabulary of tests/common/tiny.rs's datasets
(96), grouped-query attention, Llama 3's rope scaling and an untied lm_head, saved by
save_pretrained in several safetensors shards with model.safetensors.index.json, as large
checkpoints on the Hub are.

Run with the reference environment (make pyenv), on CPU, in seconds:
    .deps/py/bin/python tools/gen_llama_hf_dir.py tests/fixtures/llama/hf_sharded

Weights are perturbed as tools/gen_llama_fixtures.py does (norm gains around 1, matrices of std
1/sqrt(fan_in)), so that greedy generation has clear winners to compare token for token.
"""
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llama_fixtures import perturb  # noqa: E402

SEED = 4321


def main(out: str) -> None:
    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_dropout=0.0,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))
    model = LlamaForCausalLM(cfg).eval()
    perturb(model)
    model.save_pretrained(out, max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), shards
    print(f"wrote {out}: {model.num_parameters()} parameters in {len(shards)} shards")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llama/hf_sharded")
