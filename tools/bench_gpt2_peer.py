#!/usr/bin/env python3
"""Peer benchmark for `train` on one GPU: the same GPT-2, batch and precision in PyTorch, eager
and torch.compile. Prints one JSON line per run with tokens/s, MFU and peak memory.

    python3 tools/bench_gpt2_peer.py --model gpt2-xl --dtype bf16 --batch 8 --mode eager

The model is transformers' GPT2LMHeadModel with scaled_dot_product_attention, vocab padded to
50304 as nanoGPT does; the step is forward, backward, clip 1.0 and fused AdamW. bf16 runs under
autocast with fp32 parameters; fp16 uses autocast plus torch.amp.GradScaler.
"""
import argparse, json, statistics, time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

PRESETS = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
PEAK_FLOPS = 989e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()

    L, H, C = PRESETS[a.model]
    cfg = GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=a.seq, vocab_size=50304,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    dev = "cuda"
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=a.dtype == "fp16")
    fwd = torch.compile(model) if a.mode == "compile" else model
    x = torch.randint(0, 50257, (a.batch, a.seq), device=dev)
    y = torch.randint(0, 50257, (a.batch, a.seq), device=dev)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = fwd(input_ids=x, labels=None).logits.float()
            loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.size(-1)), y.view(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tok_s = a.batch * a.seq / dt
    flops_per_token = 6 * n_params + 12 * L * C * a.seq
    print(json.dumps({
        "peer": f"pytorch-{a.mode}", "model": a.model, "dtype": a.dtype, "batch": a.batch, "seq": a.seq,
        "params": n_params, "step_ms": dt * 1e3, "tokens_per_s": tok_s,
        "mfu": tok_s * flops_per_token / PEAK_FLOPS, "loss": float(loss),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }), flush=True)


if __name__ == "__main__":
    main()
