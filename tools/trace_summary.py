#!/usr/bin/env python3
"""Totals the device kernels of a Chrome trace from libtorch's profiler (zerokit's `profile = true`
writes one per run, out_dir/logs/trace_rank000_step_N.json; torch.profiler's export_chrome_trace
gives the same format), so a step's time can be split by kernel family.

    python3 tools/trace_summary.py TRACE.json [--top 25] [--gaps 15]

Prints the time on the device per kernel name (summed over the trace, with call counts), the
share of the traced span, and totals for families (GEMM, attention, elementwise, norm, ...);
then the device's idle time by gap size and the largest gaps with the kernels around them (a
gap is host time the device waited for: a synchronisation, or launches slower than the
kernels)."""
import argparse, collections, json, re, sys

FAMILIES = [
    ("gemm", r"gemm|cutlass|sm90_xmma|sm80_xmma|nvjet|cublas|matmul"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("adamw", r"adam"),
    ("norm", r"layer_norm|LayerNorm|rms"),
    ("softmax/loss", r"softmax|nll|cross_entropy|classifier"),
    ("reduce", r"reduce_kernel|Reduce|sum_kernel|norm_kernel"),
    ("copy/cast", r"copy|Copy|cast|to_copy"),
    ("embedding", r"embedding|index|scatter|gather|sort|segment"),
    ("nccl", r"nccl"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|Gelu|fill|mul|add"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gaps", type=int, default=15)
    a = ap.parse_args()
    with open(a.trace) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        sys.exit(f"{a.trace}: no device kernels in the trace (CUPTI missing, or a CPU run)")
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    span = end - start
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    busy = sum(v[0] for v in by_name.values())
    print(f"{a.trace}: {len(kernels)} kernels, span {span / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms "
          f"({100 * busy / span:.1f}%)")
    fam = collections.defaultdict(float)
    for name, (us, _) in by_name.items():
        label = next((f for f, pat in FAMILIES if re.search(pat, name)), "other")
        fam[label] += us
    print("\nby family (ms, % of busy):")
    for label, us in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {label:14s} {us / 1e3:8.2f}  {100 * us / busy:5.1f}%")
    print(f"\ntop {a.top} kernels (ms, calls, name):")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"  {us / 1e3:8.2f} {n:5d}  {name[:140]}")
    gaps(kernels, a.gaps)


def gaps(kernels, n):
    """Idle stretches of the device: from the latest end so far to the next kernel's start."""
    found = []
    ordered = sorted(kernels, key=lambda e: e["ts"])
    frontier, last = ordered[0]["ts"] + ordered[0]["dur"], ordered[0]["name"]
    for e in ordered[1:]:
        if e["ts"] > frontier:
            found.append((e["ts"] - frontier, last, e["name"], e["ts"]))
        if e["ts"] + e["dur"] >= frontier:
            frontier, last = e["ts"] + e["dur"], e["name"]
    t0 = ordered[0]["ts"]
    sizes = [(0, 10), (10, 100), (100, 1000), (1000, float("inf"))]
    print(f"\nidle gaps: {sum(g[0] for g in found) / 1e3:.2f} ms in {len(found)} gaps")
    for lo, hi in sizes:
        sel = [g[0] for g in found if lo <= g[0] < hi]
        print(f"  {lo:>5} us to {hi:>5} us: {len(sel):5d} gaps, {sum(sel) / 1e3:8.2f} ms")
    print(f"largest {n} (us, at ms into the trace, the kernel before -> the kernel after):")
    for g, before, after, ts in sorted(found, key=lambda x: -x[0])[:n]:
        print(f"  {g:9.1f} {(ts - t0) / 1e3:8.2f}  {before[:60]} -> {after[:60]}")


if __name__ == "__main__":
    main()
