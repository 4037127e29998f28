#!/usr/bin/env python3
"""Runs a command and samples the host memory of its process tree until it ends (issue 16's host
peak RSS), and guards the machine while it runs:

    python3 tools/rss_peak.py --out RSS.json [--interval 0.2] [--min-available-gib 3] -- CMD ARGS...

Every interval: the sum of VmRSS over the command and all its descendants (/proc/PID/status),
and the machine's used memory (MemTotal - MemAvailable, /proc/meminfo). The second catches what
per-process RSS may miss (page-locked memory the CUDA driver maps), so both are reported, the
second as a rise over its value before the command started. When MemAvailable falls below
--min-available-gib, the command's process group is killed (SIGKILL) and the JSON says so: a run
that would push the host into the kernel's OOM killer is ended before it takes the machine down.

The command runs in its own session (so the guard can end its whole tree); a SIGTERM or SIGINT
to this script (e.g. from `timeout`) is passed on to that tree as SIGKILL, so no part of it
outlives the limit.

Writes {"host_rss_peak_gib", "host_used_rise_peak_gib", "host_used_before_gib", "host_total_gib",
"host_min_available_gib", "samples", "killed_for_memory", "terminated"} to --out (atomically)
and exits with the command's status (137 when killed for memory, 124 when terminated).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

GIB = 2**30


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def tree_rss(root):
    """Sum of VmRSS (bytes) of `root` and its descendants; processes that end while being read
    are skipped."""
    children, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                ppid, vm = None, 0
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        vm = int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        pid = int(name)
        rss[pid] = vm
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--min-available-gib", type=float, default=3.0,
                    help="kill the command when the machine's MemAvailable falls below this (0: never)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (after --)")
    m0 = meminfo()
    used0 = m0["MemTotal"] - m0["MemAvailable"]
    # Its own session and process group, so the guard can end the whole tree at once.
    proc = subprocess.Popen(cmd, start_new_session=True)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    peak_rss = peak_rise = samples = 0
    min_avail = m0["MemAvailable"]
    killed = False
    while True:
        rc = proc.poll()
        m = meminfo()
        min_avail = min(min_avail, m["MemAvailable"])
        peak_rise = max(peak_rise, m["MemTotal"] - m["MemAvailable"] - used0)
        if rc is None:
            peak_rss = max(peak_rss, tree_rss(proc.pid))
        samples += 1
        if rc is not None:
            break
        if stop and not killed:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        if not killed and a.min_available_gib > 0 and m["MemAvailable"] < a.min_available_gib * GIB:
            print(f"rss_peak: MemAvailable {m['MemAvailable'] / GIB:.1f} GiB < {a.min_available_gib} GiB: "
                  f"killing {cmd[0]} (process group {proc.pid})", file=sys.stderr, flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(a.interval)
    out = {"host_rss_peak_gib": round(peak_rss / GIB, 3), "host_used_rise_peak_gib": round(peak_rise / GIB, 3),
           "host_used_before_gib": round(used0 / GIB, 3), "host_total_gib": round(m0["MemTotal"] / GIB, 3),
           "host_min_available_gib": round(min_avail / GIB, 3), "samples": samples,
           "killed_for_memory": killed and not stop, "terminated": bool(stop)}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, a.out)
    sys.exit(124 if stop else 137 if killed else (rc if rc >= 0 else 128 - rc))


if __name__ == "__main__":
    main()
