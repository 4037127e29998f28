#!/usr/bin/env python3
"""Reference fixtures for tests/llama.rs: small random LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM models saved by transformers (save_pretrained, safetensors), a batch of tokens,
transformers' fp32 logits on it (and its bf16 logits, the model loaded in bf16) and the loss for
known targets, and transformers' greedy generate on two prompts (generate.safetensors), one
directory per case under tests/fixtures/llama/.

Run with the reference environment (make pyenv), on CPU, in seconds:
    .deps/py/bin/python tools/gen_llama_fixtures.py tests/fixtures/llama [CASE...]
(no CASE: every case).

Cases:
- gqa_llama3_tied: 4 query heads sharing 2 key/value heads, Llama 3's rope scaling (with an
  original context of 16 positions, so that the 32-token batch meets the low-, medium- and
  high-frequency regimes of the scaling), the lm_head tied to the embedding.
- untied_bias: a Qwen2-like shape: untied lm_head, biases on q/k/v/o, plain rope with another
  base, and a head_dim (24) given explicitly, not hidden_size / heads.
- mistral_window: MistralForCausalLM with a sliding window of 8 on every layer (the batch is 32
  tokens; its 7-token prefix is shorter than the window), GQA 4/2, an explicit head_dim (24),
  rope base 1e6, an untied head.
- qwen2_window: Qwen2ForCausalLM with use_sliding_window and max_window_layers 1 (layer 0 global,
  layers 1 and 2 with a window of 8), q/k/v biases (none on o_proj), GQA 4/2, a tied head.

Weights are drawn far from Llama's own init (std 0.02 gives near-uniform logits that would hide
bugs): RMSNorm gains around 1, non-zero biases, matrices of std 1/sqrt(fan_in), so every
parameter visibly moves the logits.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

SEED = 1234
BATCH, SEQ = 2, 32
GEN_PROMPT, GEN_NEW = 6, 40
COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, max_position_embeddings=64,
              rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=None, eos_token_id=None,
              pad_token_id=None, attention_dropout=0.0)
CASES = {
    "gqa_llama3_tied": dict(
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, attention_bias=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "untied_bias": dict(
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False, attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=50000.0)),
    "mistral_window": dict(
        config_class=MistralConfig, num_hidden_layers=2,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False, sliding_window=8,
        rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen2_window": dict(
        config_class=Qwen2Config, num_hidden_layers=3,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


def perturb(model, norm_center: float = 1.0, embed_std: float = 0.5) -> None:
    """Weights far from the init (shared with gen_gemma_fixtures.py, whose norms add 1 to their
    gains and so centre them at 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(norm_center + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn_like(p))
            else:  # nn.Linear weights, [out, in]
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)


def make(out: str, name: str, extra: dict) -> None:
    torch.manual_seed(SEED)
    extra = dict(extra)
    config_class = extra.pop("config_class", LlamaConfig)
    cfg = config_class(**{**COMMON, **extra})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    perturb(model)
    if config_class is LlamaConfig:
        assert isinstance(model, LlamaForCausalLM)
    else:
        print(f"{name}: {type(model).__name__}, layer windows "
              f"{[getattr(layer.self_attn, 'sliding_window', cfg.sliding_window) for layer in model.model.layers]}, "
              f"attention {model.config._attn_implementation}")
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    case = os.path.join(out, name)
    model.save_pretrained(os.path.join(case, "model"))

    write_batch(case, model, cfg.vocab_size, AutoModelForCausalLM, SEED)
    write_generate(case, model, cfg.vocab_size)


def write_batch(case: str, model, vocab: int, model_class, seed: int) -> None:
    """Under `case` (model/ already saved there): a batch of random tokens and targets (some
    -1), the model's fp32 logits on it and on its 7-token prefix, the logits of model/ loaded in
    bf16 by `model_class` as a user loads it, and the loss (`seed`: the case's torch seed, recorded);
    shared with gen_gemma_fixtures.py."""
    tokens = torch.randint(0, vocab, (BATCH, SEQ), dtype=torch.int64)
    targets = torch.randint(0, vocab, (BATCH, SEQ), dtype=torch.int64)
    targets[0, :5] = -1  # nanoGPT's ignore_index, which zerokit's loss uses
    targets[1, -3:] = -1
    with torch.no_grad():
        logits = model(tokens).logits.float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        short = model(tokens[:, :7]).logits.float()
        # The saved model loaded in bf16 as a user loads it (from_pretrained keeps the rope
        # frequencies in fp32, where model.to(bfloat16) would round them), computed in bf16.
        bf16 = model_class.from_pretrained(os.path.join(case, "model"), dtype=torch.bfloat16).eval()
        logits_bf16 = bf16(tokens).logits
    save_file({"tokens": tokens.contiguous(), "targets": targets.contiguous(),
               "logits": logits.contiguous(), "logits_prefix7": short.contiguous(),
               "logits_bf16": logits_bf16.contiguous()},
              os.path.join(case, "batch.safetensors"))
    with open(os.path.join(case, "expected.json"), "w") as f:
        json.dump({"loss": loss.item(), "seed": seed, "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__}, f, indent=2)
        f.write("\n")
    print(f"wrote {case}: loss {loss.item():.6f}, logits std {logits.std().item():.3f}, "
          f"max |logits| {logits.abs().max().item():.3f}")


def write_generate(case: str, model, vocab: int) -> None:
    """Under `case`: transformers' greedy `generate(do_sample=False)` of GEN_NEW tokens after two
    random prompts of GEN_PROMPT tokens (longer, in all, than the Gemma cases' sliding window),
    for the KV-cache tests of tests/kv_cache.rs; shared with gen_gemma_fixtures.py. Drawn after
    write_batch, so the other files stay as they were. The tokens are checked to be those of
    generate without transformers' cache too, and the smallest gap between the chosen logit and
    the runner-up is printed: a near tie would make the fixture fragile."""
    prompt = torch.randint(0, vocab, (2, GEN_PROMPT), dtype=torch.int64)
    args = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=GEN_NEW,
                min_new_tokens=GEN_NEW, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.generate(prompt, **args)
        uncached = model.generate(prompt, use_cache=False, **args).sequences
    assert torch.equal(out.sequences, uncached), "transformers' generate differs with and without its cache"
    top2 = torch.stack(out.logits, 1).float().topk(2, -1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    save_file({"prompt": prompt.contiguous(), "generated": out.sequences.contiguous()},
              os.path.join(case, "generate.safetensors"))
    print(f"wrote {case}/generate.safetensors: {GEN_NEW} greedy tokens, smallest top-2 logit gap {gap:.2e}")


def main(out: str, only: list) -> None:
    unknown = set(only) - set(CASES)
    assert not unknown, f"unknown cases {unknown}"
    for name, extra in CASES.items():
        if not only or name in only:
            make(out, name, extra)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llama", sys.argv[2:])
