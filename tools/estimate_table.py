#!/usr/bin/env python3
"""`ckpt estimate` against the peaks `train` measured (issue 3), as a Markdown table.

Reads the JSON lines bench/gpu_estimate.sh writes on a GPU machine (the measured peak of each
run: device memory in use after a step less the CUDA context) and recomputes each estimate with
the ckpt binary given here, so the table always shows the current formulas:

    python3 tools/estimate_table.py bench/results/2026-12-01-h200-estimate.jsonl --bin target/release/ckpt
"""
import argparse
import json
import subprocess

EMBD = {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}


def estimate(binary, r):
    # zerokit's largest gradient bucket (the embeddings) is the communication buffer.
    cmd = [binary, "estimate", "--model", r["model"], "--vocab-size", "50304", "--gpus-per-node", str(r["gpus"]),
           "--dtype", "fp16", "--micro-batch", str(r["micro_batch"]), "--seq-len", "1024",
           "--bucket-elems", str((50304 + 1024) * EMBD[r["model"]]), "--json"]
    if r["activation_checkpointing"]:
        cmd.append("--activation-checkpointing")
    rows = json.loads(subprocess.check_output(cmd))["rows"]
    row = next(x for x in rows if x["stage"] == r["stage"] and x["offload"] == "none")
    return row["gpu_total"] / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--bin", default="target/release/ckpt")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results)]
    print("| GPT-2 | GPUs | stage | micro-batch | checkpointing | measured GiB | estimate GiB | error |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    worst = 0.0
    for r in rows:
        if "measured_gib" not in r:
            print(f"| {r['model']} | {r['gpus']} | {r['stage']} | {r['micro_batch']} | "
                  f"{'on' if r['activation_checkpointing'] else 'off'} | run failed (exit {r['exit']}) | | |")
            continue
        est = estimate(args.bin, r)
        err = (est - r["measured_gib"]) / r["measured_gib"]
        worst = max(worst, abs(err))
        print(f"| {r['model']} | {r['gpus']} | {r['stage']} | {r['micro_batch']} | "
              f"{'on' if r['activation_checkpointing'] else 'off'} | {r['measured_gib']:.2f} | {est:.2f} | {err:+.1%} |")
    print(f"\nlargest error: {worst:.1%} over {len(rows)} runs")


if __name__ == "__main__":
    main()
