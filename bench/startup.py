"""Start-up: launch to attached and launch to the command's start, kvmlockprof record
against perf lock contention -b, side by side in one run.

"Attached" is the kernel's view: the moment a process of the tree holds two BPF links
(contention_begin and contention_end; both tools attach through links), polled in
/proc/PID/fd every millisecond from just before the exec. "Command" is when the
command given to record or perf (`date +%s%N`) ran: every probe attached, the set-up
done (for kvmlockprof: the function probes planned and loaded, kallsyms and the lock
names read). In turn, --rounds times, the order shuffled each round:
  kvmlockprof        `kvmlockprof record -q -a -- sh -c 'date +%s%N > F'`, run before
                     on this boot: its attach trials' verdicts and the kernel's struct
                     offsets kept (/run/kvmlockprof)
  kvmlockprof-first  the same with what is kept per boot removed first: a first run
                     on a boot (the compiled BPF kept: kernel/bpfcache.py; the page
                     cache warm all the same)
  kvmlockprof-cold   nothing kept at all: bcc compiles the C (a first run ever, or
                     after the kernel, bcc or the settings changed)
  perf               `perf lock contention -ab -- sh -c ...` (`make peer`'s build)
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
sys.path.insert(0, ROOT)
from kvmlockprof.kernel.btf import OFFSETS  # noqa: E402
from kvmlockprof.kernel.capabilities import TRIALS  # noqa: E402


def tree(pid):
    """The process and its children: kvmlockprof attaches in a loader child that hands
    the links over to the process and exits (kvmlockprof/kernel/handover.py)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(c) for c in f.read().split()]
    except OSError:
        return [pid]


def links(pid):
    """The most BPF links any process of the tree holds (-1 once it is gone)."""
    return max(_links(p) for p in tree(pid))


def _links(pid):
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


def start_up(argv, stamp):
    """{seconds from the exec to two BPF links held, to the command's start; peak RSS
    KB at the attach}. argv ends with a command that writes its start (ns since the
    epoch) to `stamp`."""
    if os.path.exists(stamp):
        os.unlink(stamp)
    with tempfile.TemporaryFile() as err:
        t0, w0 = time.monotonic(), time.time_ns()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        out = {}
        while p.poll() is None and "attached_s" not in out:
            if links(p.pid) >= 2:
                out = {"attached_s": time.monotonic() - t0,
                       "hwm_kb": max(hwm_kb(q) or 0 for q in tree(p.pid))}
            time.sleep(0.001)
        if p.wait(timeout=120) or "attached_s" not in out or not os.path.exists(stamp):
            err.seek(0)
            raise RuntimeError(f"{argv[0]} failed (exit {p.returncode}) or never attached: "
                               f"{err.read().decode()[-500:]}")
    with open(stamp) as f:
        out["command_s"] = (int(f.read()) - w0) / 1e9
    return out


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
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        out, stamp = os.path.join(d, "r.parquet"), os.path.join(d, "stamp")
        cmd = ["--", "sh", "-c", f"date +%s%N > {stamp}"]
        ours = [klp, "record", "-q", "-a", "--force", "-o", out, *cmd]
        configs = {"kvmlockprof": ours, "kvmlockprof-first": ours, "kvmlockprof-cold": ours,
                   "perf": [perf, "lock", "contention", "-ab", *cmd]}
        # (the bench's own compile cache: the host's is left as it was)
        os.environ["KVMLOCKPROF_BPF_CACHE"] = cache = os.path.join(d, "bpf")
        start_up(ours, stamp)               # (a run before: the verdicts kept)
        result = {"rounds": a.rounds, "configs": {c: [] for c in configs}}
        for _ in range(a.rounds):
            for name in rng.sample(list(configs), len(configs)):
                if name in ("kvmlockprof-first", "kvmlockprof-cold"):
                    for kept in (TRIALS, OFFSETS):
                        if os.path.exists(kept):
                            os.unlink(kept)
                if name == "kvmlockprof-cold":
                    shutil.rmtree(cache, ignore_errors=True)
                result["configs"][name].append(start_up(configs[name], stamp))
    for what in ("attached_s", "command_s"):
        theirs = [r[what] for r in result["configs"]["perf"]]
        print(f"launch to {what[:-2]}:")
        for name, runs in result["configs"].items():
            s = [r[what] for r in runs]
            line = f"  {name:<18} median {statistics.median(s):.3f} s [{min(s):.3f}, {max(s):.3f}]"
            if what == "attached_s":
                rss = statistics.median(r["hwm_kb"] for r in runs) / 1024
                line += f", peak RSS then {rss:.0f} MiB"
            if name != "perf":
                diffs = [x - y for x, y in zip(s, theirs)]
                lo, hi = interval(diffs, rng)
                result.setdefault("minus_perf", {})[f"{name} {what}"] = {
                    "median": statistics.median(diffs), "ci95": [lo, hi]}
                line += f"; minus perf's {statistics.median(diffs):+.3f} s [{lo:+.3f}, {hi:+.3f}]"
            print(line)
    save(result, a.output)


if __name__ == "__main__":
    main()
