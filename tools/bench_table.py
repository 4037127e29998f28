#!/usr/bin/env python3
"""The JSON lines of bench/gpu_single.sh or bench/gpu_multi.sh as Markdown tables, one per model,
precision and micro-batch: tokens/s, MFU, ratio to torch.compile (the PyTorch peer to beat),
median step, peak memory, and the loss after the last step; failed contenders show their error.

    python3 tools/bench_table.py bench/results/2026-12-02-h200-single.jsonl
"""
import argparse
import json
import sys

# The baseline of the ratio column: the compiled PyTorch peer of the same shape.
BASELINES = ("pytorch-compile", "ddp-compile")


def fmt(v, spec, suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not a JSON line ({e})")
                if "peer" in r:  # gpu_multi.sh's correctness and nodes checks are other tables
                    rows.append(r)
    return rows


def table(rows):
    base = next((r.get("tokens_per_s") for r in rows if r["peer"] in BASELINES and r.get("tokens_per_s")), None)
    out = ["| contender | tokens/s | MFU | vs torch.compile | step (ms) | peak allocated (GiB) | "
           "peak used, nvidia-smi (GiB) | loss after last step | skipped steps |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        tok = r.get("tokens_per_s")
        if tok is None:
            err = r.get("error") or f"exit {r.get('exit')}, no timed steps"
            out.append(f"| {r['peer']} | failed: {err.replace('|', '/')} | | | | | | | |")
            continue
        ratio = f"{tok / base:.2f}x" if base else ""
        out.append(f"| {r['peer']} | {tok:,.0f} | {fmt(r.get('mfu') and 100 * r['mfu'], '.1f', '%')} | {ratio} | "
                   f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('peak_allocated_gib'), '.1f')} | "
                   f"{fmt(r.get('peak_used_gib_nvidia_smi'), '.1f')} | {fmt(r.get('loss'), '.4f')} | "
                   f"{r.get('skipped_steps', '')} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON-lines files")
    a = ap.parse_args()
    rows = load(a.results)
    if not rows:
        sys.exit(f"{', '.join(a.results)}: no contender lines (with a \"peer\" field)")
    groups = {}
    for r in rows:
        key = (r.get("model"), r.get("dtype"), r.get("batch", r.get("batch_per_gpu")), r.get("gpus", 1))
        groups.setdefault(key, []).append(r)
    first = rows[0]
    if "device" in first or "date" in first:
        print(f"{first.get('device', '?')}, {first.get('date', '?')}, commit {first.get('commit', '?')}, "
              f"command: `{first.get('bench_command', '?')}`\n")
    for (model, dtype, batch, gpus), rs in groups.items():
        steps = next((r.get("steps") for r in rs if r.get("steps")), None)
        print(f"{model}, {dtype}, micro-batch {batch}, {gpus} GPU{'s' if gpus != 1 else ''}"
              + (f", median of {steps} steps" if steps else "") + "\n")
        print(table(rs) + "\n")


if __name__ == "__main__":
    main()
