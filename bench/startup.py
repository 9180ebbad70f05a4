"""Start-up: launch to attached, kvmlockprof record against perf lock contention -b,
side by side in one run.

"Attached" is the kernel's view: the moment the process holds its two BPF links
(contention_begin and contention_end; both tools attach through links), polled in
/proc/PID/fd every millisecond from just before the exec. In turn, --rounds times:
  kvmlockprof        `kvmlockprof record -q -a -d 1`, run before on this boot: its
                     attach trials' verdicts kept (/run/kvmlockprof)
  kvmlockprof-first  the same with the kept verdicts removed first: a first run on a
                     boot (the page cache warm all the same)
  perf               `perf lock contention -ab -- sleep 1` (`make peer`'s build)
Prints each one's median and range, and the paired difference to perf's (median,
bootstrap 95% interval); its peak RSS (VmHWM) at the attach. Writes JSON
(bench/results/startup.json).
Example: python bench/startup.py --rounds 10
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import peer
from results_io import RESULTS, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIALS = "/run/kvmlockprof/trials.json"


def links(pid):
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_link"
            except OSError:
                pass
    except OSError:
        return -1
    return n


def hwm_kb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def attach_time(argv):
    """(seconds from the exec to two BPF links held, peak RSS KB then)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        while True:
            n = links(p.pid)
            if n >= 2:
                return time.monotonic() - t0, hwm_kb(p.pid)
            if n < 0 or p.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited before attaching: "
                                   f"{p.stderr.read().decode()[-500:]}")
            time.sleep(0.001)
    finally:
        p.wait(timeout=60)


def interval(diffs, rng):
    boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return boots[50], boots[1949]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "startup.json"))
    a = ap.parse_args()
    perf, _ = peer.find(verbose=False)
    if not perf:
        sys.exit("no built perf with lock contention -b here: run `make peer`")
    klp = shutil.which("kvmlockprof", path=os.path.dirname(sys.executable)) or "kvmlockprof"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.parquet")
        ours = [klp, "record", "-q", "-a", "-d", "1", "--force", "-o", out]
        configs = {"kvmlockprof": ours, "kvmlockprof-first": ours,
                   "perf": [perf, "lock", "contention", "-ab", "--", "sleep", "1"]}
        attach_time(ours)                   # (a run before: the verdicts kept)
        result = {"rounds": a.rounds, "configs": {c: [] for c in configs}}
        for _ in range(a.rounds):
            for name, argv in configs.items():
                if name == "kvmlockprof-first" and os.path.exists(TRIALS):
                    os.unlink(TRIALS)
                s, kb = attach_time(argv)
                result["configs"][name].append({"seconds": s, "hwm_kb": kb})
    rng = random.Random(1)
    theirs = [r["seconds"] for r in result["configs"]["perf"]]
    for name, runs in result["configs"].items():
        s = [r["seconds"] for r in runs]
        line = (f"{name:<18} launch to attached: median {statistics.median(s):.3f} s "
                f"[{min(s):.3f}, {max(s):.3f}]; peak RSS then "
                f"{statistics.median(r['hwm_kb'] for r in runs) / 1024:.0f} MiB")
        if name != "perf":
            diffs = [x - y for x, y in zip(s, theirs)]
            lo, hi = interval(diffs, rng)
            result.setdefault("minus_perf", {})[name] = {
                "median": statistics.median(diffs), "ci95": [lo, hi]}
            line += f"; minus perf's: {statistics.median(diffs):+.3f} s [{lo:+.3f}, {hi:+.3f}]"
        print(line)
    save(result, a.output)


if __name__ == "__main__":
    main()
