#!/usr/bin/env python3
"""Loads a model directory written by zerokit (Gpt::save_hf) into transformers' GPT2LMHeadModel
and writes its logits on a batch of tokens, for tests/model.rs to compare with zerokit's.

    check_hf_roundtrip.py MODEL_DIR TOKENS OUT

TOKENS is a safetensors file with an int64 tensor "tokens" [B, T]; OUT receives "logits" [B, T, V]
(fp32). Exits non-zero, saying why, when transformers reports missing, unexpected or mismatched
weights, when lm_head is not tied to wte, or when the stored dtype is not the one config.json names.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402


def main(model_dir: str, tokens_path: str, out_path: str) -> int:
    model, info = GPT2LMHeadModel.from_pretrained(model_dir, output_loading_info=True, dtype="auto")
    problems = {k: v for k, v in info.items() if v and k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if problems:
        print(f"{model_dir}: transformers reported {problems}", file=sys.stderr)
        return 1
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        print(f"{model_dir}: lm_head is not tied to transformer.wte", file=sys.stderr)
        return 1
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    if model.dtype != model.transformer.wte.weight.dtype or len(stored) != 1:
        print(f"{model_dir}: mixed dtypes {stored}", file=sys.stderr)
        return 1
    tokens = load_file(tokens_path)["tokens"]
    with torch.no_grad():
        logits = model.float().eval()(tokens).logits.float().contiguous()
    save_file({"logits": logits}, out_path)
    print(f"transformers loaded {model_dir} ({model.dtype}, stored {stored.pop()}), "
          f"logits {tuple(logits.shape)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
