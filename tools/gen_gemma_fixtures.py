#!/usr/bin/env python3
"""Reference fixtures for tests/gemma.rs: small random Gemma2ForCausalLM and Gemma3ForCausalLM
models saved by transformers (save_pretrained, safetensors), a batch of tokens, transformers'
fp32 logits on it (and its bf16 logits, the model loaded in bf16) and the loss for known targets,
and transformers' greedy generate on two prompts (46 tokens in all, beyond the window of 8), one
directory per case under tests/fixtures/gemma/.

Run with the reference environment (make pyenv), on CPU, in seconds:
    .deps/py/bin/python tools/gen_gemma_fixtures.py tests/fixtures/gemma

Cases (a 32-token batch; every case has local layers with a window of 8, shorter than it):
- gemma2_softcap: Gemma 2 with attention and final logit soft-capping at caps low enough (8
  and 5) that tanh saturates on these weights, 4 query heads sharing 2 key/value heads,
  query_pre_attn_scalar (24) other than head_dim (16), three layers (local, global, local).
- gemma3_qk_norm: Gemma 3 with QK-norm, local layers on their own rope base (10000) and global
  ones on another (1e6) with linear scaling 4, the pattern from sliding_window_pattern 3 (local,
  local, global, local), GQA 4/2, no soft-capping; saved in several shards with an index.

Weights are drawn far from Gemma's own init (std 0.02 gives near-uniform logits that would hide
bugs): RMSNorm gains (which Gemma adds to 1) around 0, matrices of std 1/sqrt(fan_in), so every
parameter visibly moves the logits.
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from gen_llama_fixtures import perturb, write_batch, write_generate

SEED = 4321
COMMON = dict(hidden_size=32, intermediate_size=64, vocab_size=128, max_position_embeddings=64,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              sliding_window=8, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              attention_dropout=0.0, hidden_activation="gelu_pytorch_tanh")
CASES = {
    "gemma2_softcap": (Gemma2Config, dict(
        num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=8.0,
        final_logit_softcapping=5.0, rope_parameters=dict(rope_type="default", rope_theta=10000.0)), None),
    "gemma3_qk_norm": (Gemma3TextConfig, dict(
        num_hidden_layers=4, query_pre_attn_scalar=16, sliding_window_pattern=3,
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                             sliding_attention=dict(rope_type="default", rope_theta=10000.0))), "40KB"),
}


def make(out: str, name: str, config_class, extra: dict, shard) -> None:
    torch.manual_seed(SEED)
    cfg = config_class(**COMMON, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    perturb(model, norm_center=0.0, embed_std=0.3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    case = os.path.join(out, name)
    if shard:
        model.save_pretrained(os.path.join(case, "model"), max_shard_size=shard)
    else:
        model.save_pretrained(os.path.join(case, "model"))

    # transformers runs Gemma 2 with eager attention (its SDPA has no soft-capping), Gemma 3 with SDPA.
    print(f"{name}: transformers' attention {model.config._attn_implementation}")
    write_batch(case, model, cfg.vocab_size, AutoModelForCausalLM, SEED)
    write_generate(case, model, cfg.vocab_size)


def main(out: str) -> None:
    for name, (config_class, extra, shard) in CASES.items():
        make(out, name, config_class, extra, shard)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gemma")
