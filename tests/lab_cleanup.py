"""Lab helper for tests/test_lab.py (run inside the lab): record and top, with the
function probes attached by fentry and by kprobe, ended each way a user ends them;
after each, the kernel's own view (bpftool, kprobe_events) must be back to what it
was before. Writes {path: [objects left]} to OUT (JSON).

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

PROBES = "contention,vms,gpc,srcu,xarray"
WORK = ["kvmlockprof", "workload", "--vcpus", "2", "--duration", "8", "--churn", "--kvmclock"]
RECORD = ["kvmlockprof", "record", "-q", "-f", "-o", "c.parquet", "--probes", PROBES]


def ended_by(sig, argv, after_s=6):
    """Run argv; send it `sig` after `after_s` seconds (None: let it end)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    if sig is not None:
        time.sleep(after_s)
        p.send_signal(sig)
    return p.wait(timeout=300)


PATHS = {
    "record, command ends (fentry)": lambda: ended_by(None, RECORD + ["--", *WORK]),
    "record, command ends (kprobe)": lambda: ended_by(
        None, RECORD + ["--prefer", "kprobe", "--", *WORK]),
    "record, command fails": lambda: ended_by(None, RECORD + ["--", "false"]),
    "record -a, SIGINT": lambda: ended_by(signal.SIGINT, RECORD + ["-a", "--", *WORK]),
    "record, SIGTERM (kprobe)": lambda: ended_by(
        signal.SIGTERM, RECORD + ["--prefer", "kprobe", "--", *WORK]),
    "top, iterations": lambda: ended_by(
        None, ["kvmlockprof", "top", "--batch", "--iterations", "2", "--probes", PROBES]),
    "top, SIGINT": lambda: ended_by(
        signal.SIGINT, ["kvmlockprof", "top", "--batch", "--probes", PROBES]),
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
