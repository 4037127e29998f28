#!/usr/bin/env python3
"""One JSON line for a benchmark contender (bench/gpu_single.sh, gpu_llama.sh, gpu_offload.sh):

    python3 tools/bench_record.py PEER MODEL DTYPE BATCH OUTFILE LOGFILE COMMAND RC PEAK WARMUP STEPS SEQ \
        DEVICE DATE COMMIT BENCH_COMMAND [EXTRA.json ...]

From zerokit's metrics.jsonl (OUTFILE ends in metrics.jsonl: the median of the steps after WARMUP,
and the device memory `train` logged: the peak of gpu_mem_gib and the CUDA context before the
model, gpu_context_gib) or from a peer's own JSON line in OUTFILE (the last line starting
'{"peer"'), with what the calling script knows added (exit status, nvidia-smi's peak in GiB,
device, date, commit, commands) and the objects of any EXTRA.json files merged in (missing ones
are skipped: e.g. tools/rss_peak.py's host memory). A contender with no result gets a line whose
"error" is the end of its log.
"""
import json
import statistics
import sys


def lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def zerokit(out, peer, model, dtype, batch, seq, warmup):
    rows = [json.loads(l) for l in lines(out) if l.strip()]
    steps = [r for r in rows if "time_ms" in r]
    timed = [r for r in steps if r["step"] > warmup]
    if not timed:
        return None
    ms = statistics.median(r["time_ms"] for r in timed)
    mem = [r["gpu_mem_gib"] for r in steps if r.get("gpu_mem_gib") is not None]
    ctx = next((r["gpu_context_gib"] for r in rows if "gpu_context_gib" in r), None)
    return {"peer": peer, "model": model, "dtype": dtype, "batch": batch, "seq": seq, "gpus": 1,
            "warmup": warmup, "steps": len(timed), "step_ms": ms, "tokens_per_s": batch * seq / (ms / 1e3),
            "step_ms_all": [r["time_ms"] for r in timed],
            "mfu": statistics.median(r["mfu"] for r in timed) / 100, "loss": steps[-1]["loss"],
            "losses": [r["loss"] for r in steps], "skipped_steps": sum(bool(r["skipped"]) for r in steps),
            "gpu_mem_peak_gib": max(mem) if mem else None, "gpu_context_gib": ctx}


def main():
    if len(sys.argv) < 17:
        sys.exit(__doc__)
    (peer, model, dtype, batch, out, logf, command, rc, peak, warmup, steps, seq,
     device, date, commit, bench_command) = sys.argv[1:17]
    batch, rc, warmup, seq = int(batch), int(rc), int(warmup), int(seq)
    if out.endswith("metrics.jsonl"):
        d = zerokit(out, peer, model, dtype, batch, seq, warmup)
    else:
        found = [l for l in lines(out) if l.startswith('{"peer"')]
        d = json.loads(found[-1]) if found else None
    if d is None:
        tail = [l for l in lines(logf) if l.strip()][-3:]
        why = {124: "timed out", 137: "killed (exit 137: timed out, or host memory)"}.get(rc, f"exit {rc}")
        d = {"peer": peer, "model": model, "dtype": dtype, "batch": batch, "seq": seq,
             "error": why + (": " + " / ".join(tail)[-400:] if tail else "")}
    d.update({"exit": rc, "peak_used_gib_nvidia_smi": float(peak) if peak else None, "device": device,
              "date": date, "commit": commit, "command": command, "bench_command": bench_command})
    for extra in sys.argv[17:]:
        try:
            with open(extra) as f:
                d.update(json.load(f))
        except FileNotFoundError:
            pass
    print(json.dumps(d), flush=True)


if __name__ == "__main__":
    main()
