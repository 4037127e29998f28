#!/usr/bin/env python3
"""One-GPU peers of `train` on the same GPT-2, batch, precision and tokens (tools/peer_gpt2.py):

    python3 tools/bench_gpt2_peer.py --mode eager|compile|deepspeed --model gpt2-xl --dtype fp16 \
        --batch 8 --data DIR

eager and compile: fp32 weights, autocast to the compute dtype, GradScaler for fp16, clip 1.0,
fused AdamW, TF32 on; compile wraps the model (loss included) in torch.compile. deepspeed: ZeRO-2
as ../shared/GPU.md ran it (overlap_comm, contiguous gradients, 5e8 buckets, dynamic fp16 loss
scale, torch AdamW passed in), as one process: the rendezvous variables get defaults here, so no
launcher is needed. Prints one JSON line (the last line of stdout): tokens/s, MFU, median step,
peak memory, the losses of every step and the settings; on failure a line with "error".
`--device cpu` with `--model tiny` is a smoke test.
"""
import argparse
import json
import os
import socket
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_gpt2 as pg  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a):
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if a.mode == "deepspeed":
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    pg.set_tf32()
    model = pg.build_model(a.model, a.seq, device, a.seed)
    dtype = pg.DTYPES[a.dtype]
    peer, settings = pg.make_peer(a.mode, model, dtype, device, a.batch, a.compile_mode, a.ds_fused_adamw)
    batches = pg.make_batches(a.warmup + a.steps, a.batch, a.seq, a.seed, 0, device, a.data)
    times, losses, skipped = pg.measure(peer, batches, a.warmup, device)
    cuda = device.type == "cuda"
    peak = [f() / 2**30 if cuda else None for f in (torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved)]
    out = pg.result(f"pytorch-{a.mode}" if a.mode != "deepspeed" else "deepspeed", a, model, 1,
                    statistics.median(times), losses.tolist(), skipped, *peak, settings, device)
    if a.mode == "deepspeed":
        import deepspeed.comm as dist
        dist.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["eager", "compile", "deepspeed"], default="eager")
    pg.add_common_args(ap, "gpt2")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        ap.error("--steps and --batch must be positive, --warmup not negative")
    try:
        line, rc = run(a), 0
    except Exception as e:
        line, rc = pg.error_line(f"pytorch-{a.mode}" if a.mode != "deepspeed" else "deepspeed", a, e), 1
    print(json.dumps(line), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
