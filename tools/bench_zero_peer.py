#!/usr/bin/env python3
"""Multi-GPU peers of `train` (issue 17) on the GPT-2, step and tokens of tools/peer_gpt2.py, one
process per GPU:

    torchrun --nproc-per-node 4 tools/bench_zero_peer.py --peer deepspeed --model gpt2-xl --dtype fp16 --data DIR

Peers: deepspeed (ZeRO-2: overlap_comm, contiguous gradients, 5e8 buckets, torch AdamW passed
in), ddp (fused AdamW, autocast, GradScaler), ddp-compile (the same under torch.compile) and fsdp
(SHARD_GRAD_OP, one unit per block, MixedPrecision, ShardedGradScaler). With --data each rank
trains on its rows of `train`'s global batch of each step, so the losses match zerokit's run on
the same GPUs. Rank 0 prints one JSON line: tokens/s over all GPUs, MFU per GPU, the slowest
rank's median step, peak memory (max over ranks), the losses averaged over ranks, the settings;
a rank that fails prints a line with "error". `--device cpu` (gloo) is a smoke test.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_gpt2 as pg  # noqa: E402


def run(a):
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = a.device == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if a.peer == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    else:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    pg.set_tf32()
    model = pg.build_model(a.model, a.seq, device, a.seed)
    dtype = pg.DTYPES[a.dtype]
    peer, settings = pg.make_peer(a.peer, model, dtype, device, a.batch, a.compile_mode, a.ds_fused_adamw)
    batches = pg.make_batches(a.warmup + a.steps, a.batch, a.seq, a.seed, rank, device, a.data)
    times, losses, skipped = pg.measure(peer, batches, a.warmup, device)
    # The job runs at the pace of its slowest rank.
    step = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
                        if cuda else [0.0, 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    losses = losses.double()
    dist.all_reduce(losses)
    out = pg.result(a.peer, a, model, world, step.item(), (losses / world).tolist(), skipped,
                    *(peak.tolist() if cuda else (None, None)), settings, device)
    dist.destroy_process_group()
    return out if rank == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["deepspeed", "ddp", "ddp-compile", "fsdp"], required=True)
    pg.add_common_args(ap, "gpt2-xl")
    ap.set_defaults(dtype="fp16")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        ap.error("--steps and --batch must be positive, --warmup not negative")
    try:
        line, rc = run(a), 0
    except Exception as e:
        line, rc = pg.error_line(a.peer, a, e), 1
        line["rank"] = int(os.environ.get("RANK", "0"))
    if line is not None:
        print(json.dumps(line), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
