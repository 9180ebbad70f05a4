"""What each function probe costs on the workload, probe by probe, side by side.

Runs the built-in workload under `record --probes contention` (the baseline) and
under `record --probes contention,P` for each function probe P, in turn, round
after round (baseline, P1, baseline, P2, ...): each P run's exit rate over the
geometric mean of the baseline runs beside it, and the probe's calls/s, ns per
call and share of one CPU by bpf_stats (record's sampled cost windows: the BPF
program only, not the kprobe or trampoline that calls it: the rate ratio has
those). Needs a kernel whose probes attach, so run it in the lab:
    kvmlockprof lab --cpus 2 --memory 3G -- python bench/probe_cost.py
(the lab's console is shown at its end: redirect to a file in the shared directory to
follow it). Xen sends are measured alone (--probes xen_evtchn --workload "... --xen").
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

import kvmlockprof
from kvmlockprof import catalog

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

KLP = [sys.executable, "-m", "kvmlockprof"]
TARGET = 0.02                   # a probe on by default costs under 2% of a CPU


def run(probes, workload, out):
    print(f"  record --probes {probes} -- workload {workload}", flush=True)
    subprocess.run(KLP + ["record", "-q", "-f", "-o", out, "--probes", probes, "--"] + KLP +
                   ["workload"] + shlex.split(workload), check=True, stdout=subprocess.DEVNULL)
    m = kvmlockprof.load(out).manifest
    w = m.get("work") or {}
    rate = w["exits_total"] / w["duration_s"] if w.get("duration_s") else \
        w["exits_total"] / m["duration_s"]
    return rate, m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workload", default="--vcpus 2 --duration 8 --churn --kvmclock")
    ap.add_argument("--probes", default=",".join(
        p.name for p in catalog.CATALOG if p.name != "contention"),
        help="function probes to measure (those this host cannot attach are reported)")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "probe-cost.json"))
    a = ap.parse_args()
    probes = [p for p in a.probes.split(",") if p]
    base, ratios, costs, status = [], {p: [] for p in probes}, {p: [] for p in probes}, {}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.parquet")
        base.append(run("contention", a.workload, out)[0])
        for r in range(a.rounds):
            for p in probes:
                rate, m = run(f"contention,{p}", a.workload, out)
                b = run("contention", a.workload, out)[0]
                base.append(b)
                st = m["probes"][p]
                status[p] = st["status"] if st["status"] == "attached" else \
                    f"{st['status']}: {st.get('reason', '')}"
                if st["status"] != "attached":
                    continue
                ratios[p].append(rate / np.sqrt(base[-2] * base[-1]))
                costs[p].append((m.get("probe_cost") or {}).get(p, {}))
                print(f"round {r} {p}: rate x{ratios[p][-1]:.3f} cost {costs[p][-1]}",
                      flush=True)
    rows = {}
    print(f"\n{'probe':<11} {'rate ratio':>10} {'[min, max]':>16} {'calls/s':>10} "
          f"{'ns/call':>8} {'CPU share':>9}  on by default (<{TARGET:.0%})")
    for p in probes:
        if not ratios[p]:
            rows[p] = {"status": status.get(p)}
            print(f"{p:<11} not attached: {status.get(p)}")
            continue
        g = float(np.exp(np.mean(np.log(ratios[p]))))
        calls = float(np.mean([c.get("calls_per_s") or 0 for c in costs[p]]))
        ns = [c.get("ns_per_call") for c in costs[p] if c.get("ns_per_call")]
        share = float(np.mean([c.get("cpu_share") or 0 for c in costs[p]]))
        rows[p] = {"status": "attached", "rate_ratio": g, "ratios": ratios[p],
                   "calls_per_s": calls, "ns_per_call": float(np.mean(ns)) if ns else None,
                   "cpu_share": share, "fires": catalog.BY_NAME[p].fires}
        print(f"{p:<11} {g:>10.3f} [{min(ratios[p]):.3f}, {max(ratios[p]):.3f}] "
              f"{calls:>10.0f} {rows[p]['ns_per_call'] or 0:>8.0f} {share:>9.2%}  "
              f"{'yes' if 1 - g < TARGET else 'NO'}")
    save({"workload": a.workload, "rounds": a.rounds, "kernel": os.uname().release,
          "baseline_rates": base, "probes": rows}, a.output)
    print(json.dumps({p: r.get("rate_ratio") for p, r in rows.items()}))


if __name__ == "__main__":
    main()
