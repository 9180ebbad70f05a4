"""Overhead: the built-in workload's work rate unprofiled vs profiled, side by side.

Configurations, run interleaved (the order rotates each round), median of --rounds:
  none                 no profiler
  kvmlockprof-agg      kvmlockprof record -a --sample-every 0 (in-kernel aggregates only)
  kvmlockprof-stream   kvmlockprof record -a (every wait streamed as a sample)
  bpftrace             the same aggregation in bpftrace (bench/contention.bt)
  perf                 perf record -e lock:contention_begin,lock:contention_end -a -g
Each profiler watches the whole host (as the peers do) and is attached before the
workload starts. Prints the work rates, the ratios to `none`, and writes JSON.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KLP = [sys.executable, "-m", "kvmlockprof"]


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    raise RuntimeError("profiler did not start")


def start(config, tmp):
    """Start a profiler; return (Popen, stop) once it is attached, or (None, None)."""
    if config == "none":
        return None, None
    if config.startswith("kvmlockprof"):
        out = os.path.join(tmp, f"{config}.parquet")
        argv = KLP + ["record", "-a", "-q", "-f", "-o", out] + \
            (["--sample-every", "0"] if config == "kvmlockprof-agg" else [])
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workload", default="--vcpus 2 --churn")
    ap.add_argument("--configs", default="none,kvmlockprof-agg,kvmlockprof-stream,bpftrace,perf")
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "results", "overhead.json"))
    a = ap.parse_args()
    configs = [c for c in a.configs.split(",")
               if c in ("none",) or c.startswith("kvmlockprof") or shutil.which(c)]
    skipped = sorted(set(a.configs.split(",")) - set(configs))
    rates = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                p, stop = start(c, tmp)
                try:
                    rates[c].append(workload(a.duration, a.workload.split()))
                finally:
                    if stop:
                        stop()
                print(f"round {r + 1}/{a.rounds} {c:<20} {rates[c][-1]['exits_per_s']:>10,.0f} "
                      f"exits/s {rates[c][-1]['churn_ops_per_s']:>8,.0f} memslot ops/s",
                      flush=True)
    result = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "workload": a.workload, "duration_s": a.duration, "rounds": a.rounds,
              "skipped": skipped, "configs": {}}
    base = {k: statistics.median(x[k] for x in rates["none"]) for k in rates["none"][0]}
    print(f"\n{'config':<20} {'exits/s':>10} {'ratio':>6} {'overhead':>8}   "
          f"{'memslot ops/s':>13} {'ratio':>6} {'overhead':>8}")
    for c in configs:
        med = {k: statistics.median(x[k] for x in rates[c]) for k in base}
        ratio = {k: med[k] / base[k] if base[k] else float("nan") for k in base}
        result["configs"][c] = {"median": med, "ratio_to_none": ratio, "runs": rates[c]}
        print(f"{c:<20} {med['exits_per_s']:>10,.0f} {ratio['exits_per_s']:>6.3f} "
              f"{1 - ratio['exits_per_s']:>8.1%}   {med['churn_ops_per_s']:>13,.0f} "
              f"{ratio['churn_ops_per_s']:>6.3f} {1 - ratio['churn_ops_per_s']:>8.1%}")
    if skipped:
        print(f"(not installed, skipped: {', '.join(skipped)})")
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {a.output}")


if __name__ == "__main__":
    main()
