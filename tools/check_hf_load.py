#!/usr/bin/env python
"""Checks that zero-to-fp32's Hugging Face directory output loads in transformers.

Converts a DeepSpeed fixture (a tiny GPT2LMHeadModel trained by DeepSpeed) into a directory,
sharded and not, adds the model's config.json, loads it with GPT2LMHeadModel.from_pretrained and
compares logits with the same model given DeepSpeed's own consolidation (reference.safetensors).

    cargo build --bin zero-to-fp32
    .deps/py/bin/python tools/check_hf_load.py --bin target/debug/zero-to-fp32
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_deepspeed_fixtures import tiny_gpt2  # noqa: E402  (the fixtures' exact model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/zero-to-fp32")
    ap.add_argument("--case", default=os.path.join(HERE, "..", "tests", "fixtures", "deepspeed", "s2_fp16_w4"))
    args = ap.parse_args()
    cfg = tiny_gpt2().config
    ref = load_file(os.path.join(args.case, "reference.safetensors"))
    expected = GPT2LMHeadModel(cfg).eval()
    # The fixtures add two test buffers that GPT-2 does not have.
    expected.load_state_dict({k: v for k, v in ref.items() if not k.startswith("zk_")}, strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    want = expected(x).logits
    with tempfile.TemporaryDirectory() as tmp:
        for shard in ("5GB", "3KB"):
            out = os.path.join(tmp, f"hf-{shard}")
            subprocess.run([args.bin, args.case, out, "--max-shard-size", shard], check=True)
            cfg.save_pretrained(out)
            files = sorted(os.listdir(out))
            model = GPT2LMHeadModel.from_pretrained(out).eval()
            got = model(x).logits
            assert torch.equal(got, want), (got - want).abs().max()
            assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
            print(f"ok: max_shard_size {shard}: {files} loads in transformers, logits identical")


if __name__ == "__main__":
    main()
