"""What `-x/--vcpu-exits` costs: the kernel's own accounting of its tracepoint programs
(bpf_stats: ns a run, runs a second), and the built-in workload's exit rate side by
side, in alternating rounds, with no profiler, with the contention probe alone, with
-x, and with the peer a user would otherwise reach for, perf recording the same
tracepoints (`perf record -e syscalls:sys_enter_ioctl --filter 'cmd==0xae80' -e
kvm:kvm_userspace_exit -e kvm:kvm_exit -e kvm:kvm_entry`).

Each profiled round's exit rate over the mean of the unprofiled rounds beside it is
one ratio; the result is their geometric mean with a bootstrap 95% interval.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overhead import geomean_ci, log_ratios                # noqa: E402
from results_io import RESULTS, save                       # noqa: E402
from kvmlockprof.kernel import bpfstats                    # noqa: E402
from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe  # noqa: E402

CONFIGS = ("none", "contention", "vcpu-exits", "perf")
PERF_EVENTS = ["-e", "syscalls:sys_enter_ioctl", "--filter", "cmd==0xae80",
               "-e", "kvm:kvm_userspace_exit", "-e", "kvm:kvm_exit", "-e", "kvm:kvm_entry"]


def workload(seconds):
    """The built-in workload's exits per second (all vCPUs), from its own count."""
    out = subprocess.run([sys.executable, "-m", "kvmlockprof", "workload", "--duration",
                          str(seconds), "--vcpus", "2"], capture_output=True, text=True,
                         check=True).stdout
    exits = int(out.split(" exits in ")[0].rsplit(" ", 1)[1])
    return exits / seconds


def round_(config, seconds, tmp, stats):
    if config == "perf":
        p = subprocess.Popen(["perf", "record", "-a", "-o", os.path.join(tmp, "perf.data"),
                              *PERF_EVENTS], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(1.0)                 # perf's events open
        try:
            return workload(seconds)
        finally:
            p.send_signal(2)
            p.wait()
    if config == "none":
        return workload(seconds)
    probe = ContentionProbe(ContentionOptions(sample_every=0,
                                              vcpu_exits=config == "vcpu-exits"))
    try:
        rate = workload(seconds)
        if config == "vcpu-exits":
            for name, fn in probe.bpf.funcs.items():
                if name.startswith(b"tracepoint__"):
                    t, n = bpfstats.run_stats(fn.fd)
                    s = stats.setdefault(name.decode(), [0, 0])
                    s[0] += t
                    s[1] += n
        return rate
    finally:
        probe.detach()
        probe.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "vcpu-exits-cost.json"))
    a = ap.parse_args()
    configs = [c for c in CONFIGS if c != "perf" or shutil.which("perf")]
    stats, rates = {}, {c: [] for c in configs}
    on = bpfstats.enable()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            # none between each profiled round: each ratio has unprofiled neighbours
            order = [c for c in configs if c != "none"]
            rng.shuffle(order)
            seq = ["none"] + [x for c in order for x in (c, "none")]
            for c in seq:
                rates[c].append((len(rates["none"]), round_(c, a.seconds, tmp, stats)))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(
                f"{c} {rates[c][-1][1]:,.0f}/s" for c in configs), flush=True)
    if on is not None:
        os.close(on)
    none = np.array([v for _, v in rates["none"]])
    result = {"rounds": a.rounds, "seconds": a.seconds, "exits_per_s": {}, "ratio": {},
              "programs": {}}
    for c in configs:
        result["exits_per_s"][c] = float(np.mean([v for _, v in rates[c]]))
        if c == "none":
            continue
        # rates[c]'s i: how many none rounds came before it: its neighbours i-1 and i
        idx = np.array([i for i, _ in rates[c]])
        on_ = np.array([v for _, v in rates[c]])
        g, lo, hi = geomean_ci(log_ratios(on_, none[idx - 1], none[idx]), rng)
        result["ratio"][c] = {"geomean": g, "ci95": [lo, hi]}
        print(f"{c:>11}: exit rate x{g:.3f} of no profiler (95% CI {lo:.3f}-{hi:.3f})")
    for name, (t, n) in stats.items():
        result["programs"][name] = {"runs": n, "ns_per_run": t / n if n else None}
        print(f"{name}: {n} runs, {t / n if n else float('nan'):.0f} ns a run (bpf_stats)")
    save(result, a.output)


if __name__ == "__main__":
    main()
