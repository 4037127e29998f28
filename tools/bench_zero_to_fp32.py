#!/usr/bin/env python
"""Times zerokit's zero-to-fp32 against DeepSpeed's zero_to_fp32.py on the same checkpoint, in one
run, and reports wall time and peak RSS of each (from wait4's rusage of that process alone).

Order: zerokit, DeepSpeed, zerokit again, so neither side alone benefits from a page cache the
other warmed; then zerokit on one thread (`--threads 1`), to show what the threads bring. Outputs are deleted after each run. DeepSpeed writes its default format (torch
pickles, 5 GB shards): its --safe_serialization path fails on tied weights (GPT-2's lm_head).

    .deps/py/bin/python tools/make_xl_deepspeed_ckpt.py /tmp/xl_ckpt
    cargo build --release --bin zero-to-fp32
    .deps/py/bin/python tools/bench_zero_to_fp32.py /tmp/xl_ckpt --bin target/release/zero-to-fp32
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def run(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[0]} failed:\n{err[-3000:]}")
    return wall, ru.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--bin", default="target/release/zero-to-fp32")
    ap.add_argument("--out", default="/tmp/zero_to_fp32_bench_out")
    args = ap.parse_args()
    results = []
    runs = [
        ("zerokit", [args.bin, args.checkpoint, args.out]),
        ("deepspeed", [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", args.checkpoint, args.out]),
        ("zerokit", [args.bin, args.checkpoint, args.out]),
        ("zerokit-1-thread", [args.bin, args.checkpoint, args.out, "--threads", "1"]),
    ]
    for name, cmd in runs:
        shutil.rmtree(args.out, ignore_errors=True)
        wall, rss = run(cmd)
        size = du(args.out)
        results.append({"tool": name, "wall_s": round(wall, 1), "peak_rss_gib": round(rss / 2**30, 2),
                        "output_gb": round(size / 1e9, 2)})
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(args.out, ignore_errors=True)
    ds = results[1]
    zk = min((r for r in results if r["tool"] == "zerokit"), key=lambda r: r["wall_s"])
    zk_rss = max(r["peak_rss_gib"] for r in results if r["tool"] == "zerokit")
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "checkpoint_gb": round(du(args.checkpoint) / 1e9, 1),
        "speedup": round(ds["wall_s"] / zk["wall_s"], 1),
        "rss_ratio": round(zk_rss / ds["peak_rss_gib"], 3),
    }))


if __name__ == "__main__":
    main()
