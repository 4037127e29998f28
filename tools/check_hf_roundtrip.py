#!/usr/bin/env python3
"""Loads a model directory written by zerokit (a tag, zero-to-fp32's output, a saved model) into
transformers with AutoModelForCausalLM (GPT2LMHeadModel or LlamaForCausalLM, as config.json
says) and writes its logits on a batch of tokens, for the tests to compare with zerokit's.

    check_hf_roundtrip.py MODEL_DIR TOKENS OUT

TOKENS is a safetensors file with an int64 tensor "tokens" [B, T]; OUT receives "logits" [B, T, V]
(fp32). When TOKENS also holds "prompt" [B, P] and "max_new_tokens" (one int64), OUT also
receives "generated": transformers' greedy generate (do_sample=False) of that many tokens after
the prompt, prompt included. When MODEL_DIR holds tokenizer.json or tokenizer.model, OUT also
receives "tokenizer_ids": AutoTokenizer's ids of TEXT (below, without special tokens), the
directory loaded as a user loads it. Exits non-zero, saying why, when transformers reports missing,
unexpected or mismatched weights, when a config that ties lm_head to the embedding loads them
untied, or when the stored dtype is not the one config.json names.
"""
import glob
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# tests/common/mod.rs's TOKENIZER_TEXT.
TEXT = "Round trip: zerokit's output loads in AutoTokenizer, ids and all."


def main(model_dir: str, tokens_path: str, out_path: str) -> int:
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, dtype="auto")
    problems = {k: v for k, v in info.items() if v and k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if problems:
        print(f"{model_dir}: transformers reported {problems}", file=sys.stderr)
        return 1
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        print(f"{model_dir}: lm_head is not tied to the token embedding", file=sys.stderr)
        return 1
    stored = set()
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(path, "pt") as f:
            stored |= {f.get_slice(k).get_dtype() for k in f.keys()}
    if model.dtype != embed.dtype or len(stored) != 1:
        print(f"{model_dir}: mixed dtypes {stored}", file=sys.stderr)
        return 1
    inputs = load_file(tokens_path)
    model = model.float().eval()
    with torch.no_grad():
        out = {"logits": model(inputs["tokens"]).logits.float().contiguous()}
        if "prompt" in inputs:
            prompt, n = inputs["prompt"], int(inputs["max_new_tokens"].item())
            out["generated"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0).contiguous()
    if any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(model_dir)
        out["tokenizer_ids"] = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        print(f"AutoTokenizer loaded {model_dir} as {type(tok).__name__}")
    save_file(out, out_path)
    print(f"transformers loaded {model_dir} as {type(model).__name__} ({model.dtype}, stored {stored.pop()}), "
          f"logits {tuple(out['logits'].shape)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
