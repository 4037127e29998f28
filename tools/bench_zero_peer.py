#!/usr/bin/env python3
"""Multi-GPU peers for `train`: DeepSpeed ZeRO-2, PyTorch DDP and FSDP SHARD_GRAD_OP on the same
GPT-2, batch and precision (fp16 by default), one process per GPU:

    torchrun --nproc-per-node 4 tools/bench_zero_peer.py --peer deepspeed --model gpt2-xl

Rank 0 prints one JSON line: tokens/s over all GPUs, MFU, peak memory per GPU (max over ranks),
and the loss after the measured steps. Random tokens, fixed seed; median step after warm-up.
"""
import argparse, json, os, statistics, time

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

PRESETS = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
PEAK_FLOPS = 989e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", choices=["deepspeed", "ddp", "fsdp"], required=True)
    ap.add_argument("--model", default="gpt2-xl")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    L, H, C = PRESETS[a.model]
    cfg = GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=a.seq, vocab_size=50304,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    x = torch.randint(0, 50257, (a.batch, a.seq), device="cuda", generator=g)
    y = torch.randint(0, 50257, (a.batch, a.seq), device="cuda", generator=g)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    if a.peer == "deepspeed":
        import deepspeed
        ds_cfg = {
            "train_micro_batch_size_per_gpu": a.batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "fp16": {"enabled": a.dtype == "fp16", "initial_scale_power": 16},
            "bf16": {"enabled": a.dtype == "bf16"},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        }
        opt = torch.optim.AdamW(groups(model), lr=6e-4, betas=(0.9, 0.95))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)

        def step():
            loss = ce(engine(input_ids=x).logits)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        if a.peer == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy, MixedPrecision
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block
            net = FSDP(model, sharding_strategy=ShardingStrategy.SHARD_GRAD_OP,
                       auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                       mixed_precision=MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype),
                       device_id=local, use_orig_params=True)
        opt = torch.optim.AdamW(groups(net), lr=6e-4, betas=(0.9, 0.95), fused=a.peer == "ddp")
        scaler = (torch.amp.GradScaler("cuda") if a.peer == "ddp" else
                  __import__("torch.distributed.fsdp.sharded_grad_scaler", fromlist=["x"]).ShardedGradScaler()) \
            if a.dtype == "fp16" else None

        def step():
            with torch.autocast("cuda", dtype=dtype):
                loss = ce(net(input_ids=x).logits)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if a.peer == "fsdp":
                net.clip_grad_norm_(1.0)
            else:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    times = []
    for i in range(a.warmup + a.steps):
        # A fresh batch each step, as zerokit draws one, so that the losses are comparable.
        x.random_(0, 50257, generator=g)
        y.random_(0, 50257, generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    dt = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    lsum = loss.detach().float().reshape(1)
    dist.all_reduce(lsum)
    if rank == 0:
        tok_s = world * a.batch * a.seq / dt.item()
        print(json.dumps({
            "peer": a.peer, "model": a.model, "dtype": a.dtype, "gpus": world, "batch_per_gpu": a.batch,
            "seq": a.seq, "params": n_params, "step_ms": dt.item() * 1e3, "tokens_per_s": tok_s,
            "mfu": tok_s / world * (6 * n_params + 12 * L * C * a.seq) / PEAK_FLOPS,
            "peak_allocated_gib": peak[0].item(), "peak_reserved_gib": peak[1].item(),
            "loss": lsum.item() / world,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
