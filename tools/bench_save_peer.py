#!/usr/bin/env python3
"""DeepSpeed's synchronous checkpoint save on the GPT-2 of tools/peer_gpt2.py, the peer of
zerokit's save stall (issue 13; bench/gpu_save.sh runs both in one call):

    python3 tools/bench_save_peer.py --model gpt2-xl --dtype fp16 --batch 8 --data DIR --save-dir DIR

Trains --warmup + --steps steps with the DeepSpeed ZeRO-2 peer (its settings as
tools/bench_gpt2_peer.py's), then times engine.save_checkpoint(save_dir, tag="bench"), from the
call until it returns with the device idle: the time training stands still. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpt2_peer as bp  # noqa: E402
import peer_gpt2 as pg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pg.add_common_args(ap, "gpt2-xl")
    ap.add_argument("--save-dir", required=True)
    a = ap.parse_args()
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(bp.free_port()))
    pg.set_tf32()
    model = pg.build_model(a.model, a.seq, device, a.seed)
    peer, settings = pg.make_peer("deepspeed", model, pg.DTYPES[a.dtype], device, a.batch)
    batches = pg.make_batches(a.warmup + a.steps, a.batch, a.seq, a.seed, 0, device, a.data)
    pg.measure(peer, batches, a.warmup, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    peer.engine.save_checkpoint(a.save_dir, tag="bench")
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    tag = os.path.join(a.save_dir, "bench")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tag) for f in fs)
    print(json.dumps({"peer": "deepspeed", "what": "save_checkpoint", "model": a.model, "dtype": a.dtype,
                      "batch": a.batch, "stall_s": secs, "bytes": size, "settings": settings}, default=str),
          flush=True)


if __name__ == "__main__":
    main()
