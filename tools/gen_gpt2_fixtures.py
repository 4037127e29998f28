#!/usr/bin/env python3
"""Reference fixtures for tests/model.rs: a small random GPT-2 saved by transformers, a batch of
tokens, transformers' logits on it, and the nanoGPT-style loss for known targets.

Run with the reference environment (make pyenv):
    .deps/py/bin/python tools/gen_gpt2_fixtures.py tests/fixtures/gpt2

Weights are drawn far from GPT-2's own init (std 0.02 gives near-uniform logits that would hide
bugs): larger weights, LayerNorm gains around 1 and non-zero biases, so every parameter visibly
moves the logits.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

SEED = 1234
CFG = dict(n_layer=3, n_head=4, n_embd=32, n_positions=32, vocab_size=1000)
BATCH, SEQ = 2, 32


def main(out: str) -> None:
    torch.manual_seed(SEED)
    cfg = GPT2Config(**CFG, bos_token_id=None, eos_token_id=None,
                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p.shape[0] if p.dim() == 2 and "wte" not in name and "wpe" not in name else 1
                std = 0.5 if fan_in == 1 else 1.0 / fan_in ** 0.5
                p.copy_(std * torch.randn_like(p))

    model_dir = os.path.join(out, "model")
    model.save_pretrained(model_dir)

    tokens = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), dtype=torch.int64)
    targets = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), dtype=torch.int64)
    targets[0, :5] = -1  # nanoGPT's ignore_index
    targets[1, -3:] = -1
    with torch.no_grad():
        logits = model(tokens).logits.float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        # Also the logits of a shorter prefix, to check positions are not tied to block_size.
        short = model(tokens[:, :7]).logits.float()
    save_file({"tokens": tokens.contiguous(), "targets": targets.contiguous(),
               "logits": logits.contiguous(), "logits_prefix7": short.contiguous()},
              os.path.join(out, "batch.safetensors"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"loss": loss.item(), "seed": SEED, "config": CFG,
                   "torch": torch.__version__, "transformers": __import__("transformers").__version__},
                  f, indent=2)
        f.write("\n")
    print(f"wrote {out}: loss {loss.item():.6f}, logits std {logits.std().item():.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gpt2")
