"""Overhead: the built-in workload's work rate unprofiled vs profiled, side by side.

Configurations, run interleaved (the order rotates each round), median of --rounds:
  none                 no profiler
  kvmlockprof-agg      kvmlockprof record -a --sample-every 0 (in-kernel aggregates only)
  kvmlockprof-stream   kvmlockprof record -a (every wait streamed as a sample)
  kvmlockprof-agg-stack16  aggregates only, kernel stacks for 1 wait in 16 (--stack-every)
  bpftrace             the same aggregation in bpftrace (bench/contention.bt)
  perf                 perf record -e lock:contention_begin,lock:contention_end -a -g
Each profiler watches the whole host (as the peers do) and is attached before the
workload starts. The host is noisy (nested virtualisation: run-to-run spread of
+-10%), so each round runs every configuration once, back to back, and a
configuration's ratio is the median over rounds of its work rate divided by that
round's unprofiled rate. Two direct measures beside it, not subject to that noise:
the in-kernel cost of the BPF programs (kernel.bpf_stats_enabled: run time per
invocation and CPU share, for kvmlockprof and bpftrace) and the profiler process's
own CPU use. Prints all of it and writes JSON.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
KLP = [sys.executable, "-m", "kvmlockprof"]


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    raise RuntimeError("profiler did not start")


def prog_stats():
    """{prog id: (name, run_time_ns, run_cnt)} of the BPF programs loaded now."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: (p.get("name", ""), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out)}


def cpu_seconds(pid):
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(config, tmp):
    """Start a profiler; return (Popen, stop) once it is attached, or (None, None)."""
    if config == "none":
        return None, None
    if config.startswith("kvmlockprof"):
        out = os.path.join(tmp, f"{config}.parquet")
        argv = KLP + ["record", "-a", "-q", "-f", "-o", out] + \
            (["--sample-every", "0"] if "-agg" in config else []) + \
            (["--stack-every", "16"] if config.endswith("-stack16") else [])
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(f"{out}.partial/manifest.json") or p.poll() is not None)
    elif config == "bpftrace":
        log = os.path.join(tmp, "bpftrace.log")
        p = subprocess.Popen(["bpftrace", os.path.join(HERE, "contention.bt")],
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: "Attaching" in open(log).read() or p.poll() is not None)
        time.sleep(0.5)
    elif config == "perf":
        data = os.path.join(tmp, "perf.data")
        p = subprocess.Popen(["perf", "record", "-q", "-o", data, "-a", "-g", "-e",
                              "lock:contention_begin,lock:contention_end"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(data) and os.path.getsize(data) > 0 or
                 p.poll() is not None)
        time.sleep(0.5)
    if p.poll() is not None:
        raise RuntimeError(f"{config} exited at start ({p.returncode})")
    return p, lambda: (p.send_signal(signal.SIGINT), p.wait(120))


def workload(duration, args):
    out = subprocess.run(KLP + ["workload", "--duration", str(duration), "--json", *args],
                         capture_output=True, text=True, check=True).stdout
    w = json.loads(out.strip().splitlines()[-1])
    return {"exits_per_s": w["exits_total"] / w["duration_s"],
            "churn_ops_per_s": w["churn_ops"] / w["duration_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workload", default="--vcpus 2 --churn")
    ap.add_argument("--configs", default="none,kvmlockprof-agg,kvmlockprof-stream,"
                    "kvmlockprof-agg-stack16,bpftrace,perf")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "overhead.json"))
    a = ap.parse_args()
    configs = [c for c in a.configs.split(",")
               if c in ("none",) or c.startswith("kvmlockprof") or shutil.which(c)]
    skipped = sorted(set(a.configs.split(",")) - set(configs))
    rates = {c: [] for c in configs}
    cost = {c: [] for c in configs}          # per run: BPF ns/s, BPF events/s, own CPU
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_was = f.read().strip()
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write("1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for c in order:
                    before = prog_stats()
                    p, stop = start(c, tmp)
                    try:
                        mine = set(prog_stats()) - set(before)
                        s0, c0, t0 = prog_stats(), cpu_seconds(p.pid) if p else 0, \
                            time.monotonic()
                        rates[c].append(workload(a.duration, a.workload.split()))
                        s1, c1, t1 = prog_stats(), cpu_seconds(p.pid) if p else 0, \
                            time.monotonic()
                    finally:
                        if stop:
                            stop()
                    dt = t1 - t0
                    ns = sum(s1[i][1] - s0[i][1] for i in mine if i in s0 and i in s1)
                    cnt = sum(s1[i][2] - s0[i][2] for i in mine if i in s0 and i in s1)
                    cost[c].append({"bpf_ns_per_s": ns / dt, "bpf_runs_per_s": cnt / dt,
                                    "own_cpu": (c1 - c0) / dt})
                    print(f"round {r + 1}/{a.rounds} {c:<24} "
                          f"{rates[c][-1]['exits_per_s']:>10,.0f} exits/s "
                          f"{rates[c][-1]['churn_ops_per_s']:>8,.0f} memslot ops/s  "
                          f"BPF {ns / dt / 1e7:5.2f}% CPU  own {(c1 - c0) / dt:6.1%} CPU",
                          flush=True)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was)
    result = {"workload": a.workload, "duration_s": a.duration, "rounds": a.rounds,
              "skipped": skipped, "configs": {}}
    keys = list(rates["none"][0])
    print(f"\n{'config':<24} {'exits/s':>10} {'ratio':>6}   {'memslot ops/s':>13} "
          f"{'ratio':>6}   {'BPF ns/event':>12} {'BPF CPU':>8} {'own CPU':>8}")
    for c in configs:
        med = {k: statistics.median(x[k] for x in rates[c]) for k in keys}
        # per round: this config's rate / the unprofiled rate of the same round
        ratio = {k: statistics.median(x[k] / n[k] for x, n in zip(rates[c], rates["none"])
                                      if n[k]) for k in keys}
        runs = sum(x["bpf_runs_per_s"] for x in cost[c])
        per_event = sum(x["bpf_ns_per_s"] for x in cost[c]) / runs if runs else float("nan")
        bpf_cpu = statistics.median(x["bpf_ns_per_s"] / 1e9 for x in cost[c])
        own = statistics.median(x["own_cpu"] for x in cost[c])
        result["configs"][c] = {"median": med, "ratio_to_none": ratio, "runs": rates[c],
                                "bpf_ns_per_invocation": per_event, "bpf_cpu_share": bpf_cpu,
                                "own_cpu_share": own, "cost_runs": cost[c]}
        print(f"{c:<24} {med['exits_per_s']:>10,.0f} {ratio['exits_per_s']:>6.3f}   "
              f"{med['churn_ops_per_s']:>13,.0f} {ratio['churn_ops_per_s']:>6.3f}   "
              f"{per_event:>12,.0f} {bpf_cpu:>8.2%} {own:>8.2%}")
    print("ratio: median over rounds of (rate profiled / rate unprofiled, same round); "
          "BPF CPU and own CPU: share of one CPU")
    if skipped:
        print(f"(not installed, skipped: {', '.join(skipped)})")
    save(result, a.output)


if __name__ == "__main__":
    main()
