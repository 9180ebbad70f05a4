"""record's memory through a contention storm: its RSS (and of it anonymous) every
2 s while the storm's command runs, and its VmHWM for the whole run, from /proc
(smaps_rollup, status) polled every 0.5 s; the loader child's peak from the
recording's manifest.

The storm is the live test's (tests/test_live_robustness.py): the built-in workload,
2 vCPUs, memslot churn in 4 threads. Extra arguments go to `record` (e.g.
`--sample-every 0`); ARROW_DEFAULT_MEMORY_POOL in the environment picks pyarrow's
allocator for a comparison. Writes JSON (bench/results/storm-memory.json).
Example: python bench/storm_memory.py --seconds 60
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvmlockprof  # noqa: E402
from results_io import RESULTS, save  # noqa: E402


def _read(pid):
    """(RSS, anonymous, VmHWM) in MiB, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            roll = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ":" in ln
                    and ln.split()[1].isdigit()}
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    return roll.get("Rss", 0) >> 10, roll.get("Anonymous", 0) >> 10, hwm >> 10


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "storm-memory.json"))
    args, record_args = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "storm.parquet")
        p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", out,
                              *record_args, "--", sys.executable, "-m", "kvmlockprof",
                              "workload", "--duration", str(args.seconds), "--vcpus", "2",
                              "--churn", "--churn-threads", "4"],
                             cwd=ROOT, stdout=subprocess.DEVNULL)
        t0, series, hwm = time.monotonic(), [], 0
        while p.poll() is None:
            r = _read(p.pid)
            if r:
                hwm = max(hwm, r[2])
                if not series or time.monotonic() - t0 >= series[-1][0] + 2:
                    series.append((round(time.monotonic() - t0, 1), r[0], r[1]))
            time.sleep(0.5)
        if p.returncode:
            sys.exit(f"record exited {p.returncode}")
        m = kvmlockprof.load(out).manifest
    steady = [s for s in series if 5 <= s[0] <= args.seconds]
    res = {"seconds": args.seconds, "record_args": record_args,
           "arrow_pool": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "(kvmlockprof's)"),
           "waits": m["counters"]["end"], "series_s_rss_anon_mib": series,
           "steady_rss_mib": [min(s[1] for s in steady), max(s[1] for s in steady)],
           "steady_anon_mib": [min(s[2] for s in steady), max(s[2] for s in steady)],
           "vmhwm_mib": hwm, "loader_peak_mib": m["loader_peak_rss_kb"] >> 10}
    print(f"{res['waits']:,} waits in {args.seconds} s; while recording RSS "
          f"{res['steady_rss_mib'][0]}-{res['steady_rss_mib'][1]} MiB (anonymous "
          f"{res['steady_anon_mib'][0]}-{res['steady_anon_mib'][1]}); VmHWM {hwm} MiB; "
          f"the loader child's peak {res['loader_peak_mib']} MiB")
    save(res, args.output)


if __name__ == "__main__":
    main()
