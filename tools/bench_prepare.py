#!/usr/bin/env python3
"""Throughput of zerokit's `prepare` against OpenAI's tiktoken, and prepare's peak memory.

Throughput: one JSONL corpus of documents of about 4 KB made of Shakespeare's paragraphs
(data/tinyshakespeare.txt cycled to --corpus-mb), tokenized with GPT-2's encoding at each thread count by
  - zerokit: the whole `prepare` run (start-up, reading, JSON parsing, tokenizing, writing),
  - tiktoken: `encode_ordinary_batch(docs, num_threads=N)` on the documents already in memory,
best of --repeat runs each, in one process so both see the same machine state. The token
totals must agree (zerokit's minus its one EOT per document).

Scaling (--scaling-mb M): zerokit alone on an M MB corpus at each thread count, whole-run wall
time and prepare's own time (the whole run less the ~0.3 s process start-up).

Memory (--memory-gb G): a corpus of G GB of repeated text written to a temporary directory,
tokenized once as JSONL documents and once as a single plain-text file (the two-pass character
split); peak RSS from /usr/bin/time -v; the corpus is deleted afterwards.

  .deps/py/bin/python tools/bench_prepare.py --bin target/release/prepare
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from gen_tokenizer_fixtures import offline_cache  # noqa: E402


def paragraphs():
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        return [p for p in f.read().split("\n\n") if p.strip()]


def write_jsonl(path, target_bytes, doc_bytes=4096):
    """Documents of consecutive paragraphs, at least doc_bytes each (OpenWebText's documents
    average a few KB), cycling through the play until the file reaches target_bytes."""
    paras = paragraphs()
    docs, size, i = [], 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            parts, n = [], 0
            while n < doc_bytes:
                p = paras[i % len(paras)]
                parts.append(p)
                n += len(p) + 2
                i += 1
            doc = "\n\n".join(parts)
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line.encode())
            docs.append(doc)
    return docs


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def own_seconds(stderr):
    """prepare's own time, from its summary line: the run less process start-up."""
    m = re.search(r"tokens \(\d+ docs\), ([\d.]+) s, ", stderr)
    if not m:
        sys.exit(f"no summary line in prepare's output:\n{stderr}")
    return float(m.group(1))


def run_prepare(binary, inputs, out, threads, extra=()):
    cmd = [binary, *inputs, "--out", out, "--threads", str(threads), *extra]
    # A fresh output each time, as on a first run: replacing an earlier one (--force) would add
    # the deletion of its files, a few tenths of a second per GB on tmpfs, to the time.
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    # Debug level adds the serial stages' CPU time (the reader's and the writer's).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RUST_LOG": "debug"})
    stderr = proc.stderr.read()
    proc.stderr.close()
    # wait4 gives this child's own CPU time: whether more threads spend more CPU per byte (the
    # cores slow each other down) or the same CPU with idle gaps (the pipeline stalls).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"prepare failed: {' '.join(cmd)}\n{stderr}")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    meta["_cpu_s"] = usage.ru_utime + usage.ru_stime
    # prepare's own time: the run less process start-up (loading libtorch, which every zerokit
    # binary links, costs about 0.3 s whatever the corpus).
    meta["_pipeline_s"] = own_seconds(stderr)
    m = re.search(r"serial stages: reader ([\d.]+) s CPU \(([\d.]+) s waiting for tokenizing\), reordering ([\d.]+) s CPU", stderr)
    files = [float(x) for x in re.findall(r"serial stages: \S+ written with ([\d.]+) s CPU", stderr)]
    hashes = [float(x) for x in re.findall(r"serial stages: sha256 of \d+ bytes with ([\d.]+) s CPU", stderr)]
    meta["_serial_cpu_s"] = (float(m.group(1)), float(m.group(3)), max(files), max(hashes), float(m.group(2))) if m and files else None
    m = re.search(r"phases: set-up ([\d.]+) s, pipeline ([\d.]+) s, finishing ([\d.]+) s", stderr)
    meta["_phases_s"] = tuple(float(x) for x in m.groups()) if m else None
    return dt, meta


def throughput(args, tmp):
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")
    corpus = os.path.join(tmp, "corpus.jsonl")
    docs = write_jsonl(corpus, args.corpus_mb * 1_000_000)
    text_bytes = sum(len(d.encode()) for d in docs)
    file_bytes = os.path.getsize(corpus)
    out = os.path.join(tmp, "out")
    rows = []
    for threads in args.threads:
        best_zk, best_own, meta = None, None, None
        for _ in range(args.repeat):
            dt, meta = run_prepare(args.bin, [corpus], out, threads, ["--val-fraction", "0.01"])
            best_zk = dt if best_zk is None else min(best_zk, dt)
            best_own = meta["_pipeline_s"] if best_own is None else min(best_own, meta["_pipeline_s"])
        zk_tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
        n_docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
        best_tt, tt_tokens = None, 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ids = enc.encode_ordinary_batch(docs, num_threads=threads)
            dt = time.perf_counter() - t0
            best_tt = dt if best_tt is None else min(best_tt, dt)
            tt_tokens = sum(len(x) for x in ids)
            del ids
        if n_docs != len(docs) or zk_tokens - n_docs != tt_tokens:
            sys.exit(f"token counts differ: zerokit {zk_tokens} - {n_docs} EOT vs tiktoken {tt_tokens}")
        rows.append({
            "threads": threads,
            "zerokit_s": best_zk, "tiktoken_s": best_tt,
            "zerokit_MBps": text_bytes / best_zk / 1e6, "tiktoken_MBps": text_bytes / best_tt / 1e6,
            "zerokit_Mtokps": tt_tokens / best_zk / 1e6, "tiktoken_Mtokps": tt_tokens / best_tt / 1e6,
            "ratio": best_tt / best_zk, "zerokit_own_s": best_own, "zerokit_own_MBps": text_bytes / best_own / 1e6,
        })
    print(f"\ncorpus: {len(docs)} documents, {text_bytes / 1e6:.1f} MB of text ({file_bytes / 1e6:.1f} MB JSONL), "
          f"{tt_tokens} tokens; best of {args.repeat}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; tiktoken {tiktoken.__version__}")
    print("zerokit: whole runs (process start-up, about 0.35 s, included); own: prepare's own timer")
    print("| threads | zerokit MB/s | zerokit M tok/s | tiktoken MB/s | tiktoken M tok/s | zerokit / tiktoken "
          "| zerokit own MB/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['threads']} | {r['zerokit_MBps']:.1f} | {r['zerokit_Mtokps']:.2f} | {r['tiktoken_MBps']:.1f} | "
              f"{r['tiktoken_Mtokps']:.2f} | {r['ratio']:.2f}x | {r['zerokit_own_MBps']:.1f} |")
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            s_zk = r["zerokit_MBps"] / base["zerokit_MBps"]
            s_own = r["zerokit_own_MBps"] / base["zerokit_own_MBps"]
            s_tt = r["tiktoken_MBps"] / base["tiktoken_MBps"]
            print(f"scaling {base['threads']} -> {r['threads']} threads: zerokit {s_zk:.2f}x (own {s_own:.2f}x), "
                  f"tiktoken {s_tt:.2f}x")
    return {"docs": len(docs), "text_bytes": text_bytes, "tokens": tt_tokens, "rows": rows}


def scaling(args, tmp):
    """zerokit alone on a bigger corpus, where the fixed start-up no longer hides how the
    pipeline scales: wall time of the whole run and prepare's own time, per thread count."""
    corpus = os.path.join(tmp, "scaling.jsonl")
    write_jsonl(corpus, args.scaling_mb * 1_000_000)
    size = os.path.getsize(corpus)
    out = os.path.join(tmp, "out-scaling")
    rows = []
    for threads in args.threads:
        runs = [run_prepare(args.bin, [corpus], out, threads, ["--val-fraction", "0.01"]) for _ in range(args.repeat)]
        wall = min(dt for dt, _ in runs)
        own = min(m["_pipeline_s"] for _, m in runs)
        serial = [min(m["_serial_cpu_s"][k] for _, m in runs) for k in range(5)]
        cpu = min(m["_cpu_s"] for _, m in runs)
        # The phases of the fastest run.
        phases = min((m for _, m in runs), key=lambda m: m["_pipeline_s"])["_phases_s"]
        rows.append({"threads": threads, "wall_s": wall, "pipeline_s": own, "cpu_s": cpu,
                     "wall_MBps": size / wall / 1e6, "pipeline_MBps": size / own / 1e6,
                     "reader_cpu_s": serial[0], "reorder_cpu_s": serial[1], "file_writer_cpu_s": serial[2],
                     "sha256_cpu_s": serial[3], "reader_waiting_s": serial[4], "setup_s": phases[0], "finishing_s": phases[2]})
    # The machine's own ceiling: n independent one-thread runs at once, each on a slice of
    # size/max(threads), share nothing but the cores, memory and disk.
    piece = os.path.join(tmp, "slice.jsonl")
    write_jsonl(piece, args.scaling_mb * 1_000_000 // max(args.threads))
    piece_size = os.path.getsize(piece)
    for r in rows:
        n = r["threads"]
        procs = [subprocess.Popen([args.bin, piece, "--out", os.path.join(tmp, f"indep{k}"), "--force", "--threads", "1",
                                   "--val-fraction", "0.01"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k in range(n)]
        errs = [p.communicate()[1] for p in procs]
        if any(p.returncode != 0 for p in procs):
            sys.exit("an independent prepare run failed")
        # Their own times (start-up excluded, as in the column compared): the slowest sets the pace.
        own = max(own_seconds(e) for e in errs)
        r["independent_MBps"] = n * piece_size / own / 1e6
        for k in range(n):
            shutil.rmtree(os.path.join(tmp, f"indep{k}"), ignore_errors=True)
    os.remove(piece)
    os.remove(corpus)
    shutil.rmtree(out, ignore_errors=True)
    base = rows[0]
    print(f"\nscaling: zerokit on {size / 1e6:.0f} MB of JSONL, best of {args.repeat}")
    print(f"independent: as many one-thread runs at once, each on {piece_size / 1e6:.0f} MB (the machine's ceiling)")
    r1 = rows[0]
    worst = max(r1["reader_cpu_s"], r1["reorder_cpu_s"], r1["file_writer_cpu_s"], r1["sha256_cpu_s"])
    print(f"serial stages at 1 thread, CPU s: reader {r1['reader_cpu_s']:.2f}, reordering {r1['reorder_cpu_s']:.2f}, "
          f"writing train.bin {r1['file_writer_cpu_s']:.2f}, hashing the input {r1['sha256_cpu_s']:.2f}: "
          f"no thread count can pass {size / worst / 1e6:.0f} MB/s")
    print("per thread count, s: set-up / finishing (fixed phases) / reader's CPU / reader waiting for tokenizing: "
          + ", ".join(f"{r['threads']}: {r['setup_s']:.2f} / {r['finishing_s']:.2f} / {r['reader_cpu_s']:.2f} / "
                      f"{r['reader_waiting_s']:.2f}" for r in rows))
    print("CPU s: the process's user + system time; if it grows with the threads, the cores slow each other")
    print("down (shared caches, memory, turbo); if it stays flat while the speed-up falls short, threads wait.")
    print("| threads | whole run s | MB/s | speed-up | prepare's own s | MB/s | speed-up | efficiency | CPU s "
          "| independent runs MB/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        su_w = base["wall_s"] / r["wall_s"]
        su_p = base["pipeline_s"] / r["pipeline_s"]
        r.update({"speedup_wall": su_w, "speedup_pipeline": su_p})
        print(f"| {r['threads']} | {r['wall_s']:.2f} | {r['wall_MBps']:.0f} | {su_w:.2f}x | {r['pipeline_s']:.2f} | "
              f"{r['pipeline_MBps']:.0f} | {su_p:.2f}x | {su_p / r['threads'] * base['threads']:.0%} | {r['cpu_s']:.1f} | "
              f"{r['independent_MBps']:.0f} | {r['independent_MBps'] / base['independent_MBps']:.2f}x |")
    return {"bytes": size, "rows": rows}


def peak_rss_kb(cmd):
    if not os.path.exists("/usr/bin/time"):
        # The same figure from the kernel, through a fresh parent so that only this run counts.
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                   "sys.stderr.write(r.stderr.decode()); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr}")
        return int(res.stdout.split()[-1]), f"{time.perf_counter() - t0:.1f} s"
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    w = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr)
    return int(m.group(1)), w.group(1)


def memory(args, tmp):
    target = int(args.memory_gb * 1e9)
    results = []
    # A small run gives the baseline the big ones are compared with.
    small = os.path.join(ROOT, "data", "tinyshakespeare.txt")
    rss, wall = peak_rss_kb([args.bin, small, "--out", os.path.join(tmp, "o0"), "--force", "--threads", str(args.threads[-1])])
    results.append(("1.1 MB text file (baseline)", os.path.getsize(small), rss, wall))
    jsonl = os.path.join(tmp, "big.jsonl")
    write_jsonl(jsonl, target)
    rss, wall = peak_rss_kb([args.bin, jsonl, "--out", os.path.join(tmp, "o1"), "--force", "--threads", str(args.threads[-1])])
    results.append(("JSONL documents", os.path.getsize(jsonl), rss, wall))
    os.remove(jsonl)
    shutil.rmtree(os.path.join(tmp, "o1"))
    text = os.path.join(tmp, "big.txt")
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), "rb") as f:
        block = f.read()
    with open(text, "wb") as f:
        size = 0
        while size < target:
            f.write(block)
            size += len(block)
    rss, wall = peak_rss_kb([args.bin, text, "--out", os.path.join(tmp, "o2"), "--force", "--threads", str(args.threads[-1])])
    results.append(("one plain-text document (chars mode, 2 passes)", os.path.getsize(text), rss, wall))
    os.remove(text)
    how = "/usr/bin/time -v" if os.path.exists("/usr/bin/time") else "getrusage(RUSAGE_CHILDREN)"
    print(f"\npeak RSS with {args.threads[-1]} threads ({how}):")
    print("| input | size | peak RSS | wall |")
    print("| --- | ---: | ---: | ---: |")
    for name, size, rss, wall in results:
        print(f"| {name} | {size / 1e9:.2f} GB | {rss / 1024:.0f} MiB | {wall} |")
    return [{"input": n, "bytes": s, "peak_rss_kb": r, "wall": w} for n, s, r, w in results]


RANK_SHA256 = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930": "r50k_base",
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069": "p50k_base",
}


def ranks_from_binary(binary, out_dir):
    """Machines without the cargo registry (the GPU machines) still have the rank files: the
    prepare binary embeds them verbatim. Found by their first line, kept only if the sha256
    matches tiktoken's pin for the file."""
    with open(binary, "rb") as f:
        data = f.read()
    import hashlib
    found, i = set(), data.find(b"IQ== 0\n")
    while i >= 0:
        for last in (b" 50255\n", b" 50280\n"):
            j = data.find(last, i)
            if j > 0:
                blob = data[i:j + len(last)]
                name = RANK_SHA256.get(hashlib.sha256(blob).hexdigest())
                if name:
                    with open(os.path.join(out_dir, name + ".tiktoken"), "wb") as f:
                        f.write(blob)
                    found.add(name)
        i = data.find(b"IQ== 0\n", i + 1)
    if found != set(RANK_SHA256.values()):
        sys.exit(f"rank files not found in {binary} (found {sorted(found)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "prepare"))
    ap.add_argument("--corpus-mb", type=int, default=64)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-gb", type=float, default=0, help="also measure peak RSS on a corpus this big")
    ap.add_argument("--scaling-mb", type=int, default=0, help="also time zerokit alone on a corpus this big")
    ap.add_argument("--tmp", default=None, help="where to write the generated corpora (default: system temp)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    tmp = tempfile.mkdtemp(prefix="zerokit-bench-", dir=args.tmp)
    try:
        registry = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/tiktoken-rs-0.12.*/assets"))
        if not registry and not os.environ.get("ZEROKIT_TIKTOKEN_ASSETS"):
            os.environ["ZEROKIT_TIKTOKEN_ASSETS"] = os.path.join(tmp, "assets")
            os.makedirs(os.environ["ZEROKIT_TIKTOKEN_ASSETS"])
            ranks_from_binary(args.bin, os.environ["ZEROKIT_TIKTOKEN_ASSETS"])
        offline_cache()
        print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.bin}")
        result = {"throughput": throughput(args, tmp)}
        if args.scaling_mb:
            result["scaling"] = scaling(args, tmp)
        if args.memory_gb:
            result["memory"] = memory(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
