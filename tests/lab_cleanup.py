"""Lab helper for tests/test_lab.py (run inside the lab): record and top, with the
function probes attached by fentry and by kprobe, ended by the command's end, Ctrl-C
and SIGTERM (the other paths are the host's tests: under TCG each run takes
minutes); after each, the kernel's own view (bpftool, kprobe_events) must be back
to what it was before. Writes {path: [objects left]} to OUT (JSON).

    python lab_cleanup.py OUT
"""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import kernel_objects  # noqa: E402

# The probes that attach by function (fentry, kprobe) on the lab kernel; each
# record compiles and attaches them, a minute or more under TCG.
PROBES = "contention,vms,gpc,srcu"
WORK = ["kvmlockprof", "workload", "--vcpus", "2", "--duration", "8", "--churn", "--kvmclock"]
RECORD = ["kvmlockprof", "record", "-q", "-f", "-o", "c.parquet", "--probes", PROBES]
TIMEOUT_S = 400


MANIFEST = "c.parquet.partial/manifest.json"      # written once record has attached


def ended_by(sig, argv, ready=lambda: False):
    """Run argv; once ready(), send it `sig` (None: let it end); wait for its end."""
    if os.path.exists(MANIFEST):
        os.unlink(MANIFEST)
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT_S
    if sig is not None:
        while p.poll() is None and not ready() and time.time() < deadline:
            time.sleep(1)
        p.send_signal(sig)
    return p.wait(timeout=TIMEOUT_S)


def after(seconds):
    t0 = time.time()
    return lambda: time.time() - t0 > seconds


PATHS = {
    "record, command ends (fentry)": lambda: ended_by(None, RECORD + ["--", *WORK]),
    "record, SIGINT (kprobe)": lambda: ended_by(
        signal.SIGINT, RECORD + ["--prefer", "kprobe", "--", *WORK],
        lambda: os.path.exists(MANIFEST)),
    "top, SIGTERM": lambda: ended_by(
        signal.SIGTERM, ["kvmlockprof", "top", "--batch", "--probes", PROBES], after(150)),
}


def main(out):
    before, result = kernel_objects(), {}
    for name, run in PATHS.items():
        rc = run()
        deadline = time.time() + 60     # maps are freed after RCU grace periods
        while (left := kernel_objects() - before) and time.time() < deadline:
            time.sleep(0.5)
        result[name] = {"rc": rc, "left": sorted(map(list, left))}
        print(f"{name}: rc {rc}, left {len(left)}", flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
