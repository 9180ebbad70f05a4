"""When each rwlock was taken for write and released, by the kernel's own tracer (no
project code): kprobe events on _raw_write_lock's and _raw_write_unlock's entries
and the lock contention tracepoints, in an ftrace instance of their own around a
command; written as JSON lines (tid, tgid, ts_ns, event, fields) for test_lab's
hold-time check. x86-64 (the lock argument in %di). Run as root:
hold_oracle.py OUT -- COMMAND..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from owner_oracle import trace  # noqa: E402

GROUP = "kvmlp_hold"
PROBES = [f"p:{GROUP}/write_lock _raw_write_lock lock=%di:x64",
          f"p:{GROUP}/write_unlock _raw_write_unlock lock=%di:x64"]


if __name__ == "__main__":
    trace(sys.argv[1], sys.argv[sys.argv.index("--") + 1:], GROUP, PROBES, "_raw_write_unlock")
