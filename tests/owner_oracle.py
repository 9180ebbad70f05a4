"""Who held each mutex, by the kernel's own tracer (no project code): kprobe events on
the mutex lock functions' entries and returns and on mutex_unlock, and the lock
contention tracepoints, in an ftrace instance of their own around a command; written
as JSON lines (tid, tgid, ts_ns, event, fields) for test_lab's owner check. x86-64
(the lock argument in %di). Run as root: owner_oracle.py OUT -- COMMAND..."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ftrace import Ftrace  # noqa: E402

from kvmlockprof.kernel import tracefs  # noqa: E402

GROUP = "kvmlp_owner"
LOCKERS = ("mutex_lock", "mutex_lock_killable", "mutex_lock_interruptible", "mutex_trylock")
# (mutex_lock returns void: the kernel refuses a $retval of it)
PROBES = [f"p:{GROUP}/{f} {f} lock=%di:x64" for f in LOCKERS] + \
    [f"r512:{GROUP}/{f}_ret {f}" + (" ret=$retval:s32" if f != "mutex_lock" else "")
     for f in LOCKERS] + \
    [f"p:{GROUP}/mutex_unlock mutex_unlock lock=%di:x64"]


def kprobe_events(lines):
    """Each definition written on its own; those the kernel refuses are said (with
    tracefs' error_log) and left out: [the ones made]."""
    made = []
    for ln in lines:
        # (os.open: Python's "a" mode seeks to the end, which tracefs refuses: EINVAL)
        fd = os.open(os.path.join(tracefs.tracefs_path(), "kprobe_events"),
                     os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (ln + "\n").encode())
            made.append(ln)
        except OSError as e:
            with open(os.path.join(tracefs.tracefs_path(), "error_log")) as f:
                log = f.read().strip().splitlines()[-3:]
            print(f"owner_oracle: the kernel refused {ln!r}: {e}; {log}", file=sys.stderr)
        finally:
            os.close(fd)
    return made


def missed(probes):
    """Hits the kprobes missed (kprobe_profile's third column), of these."""
    ours = {p.split()[0].split("/")[1] for p in probes}     # (those not made: absent)
    with open(os.path.join(tracefs.tracefs_path(), "kprobe_profile")) as f:
        return sum(int(ln.split()[2]) for ln in f if ln.split()[0] in ours)


def trace(out, cmd, group, probes, needed):
    """The kprobes and the contention tracepoints around cmd, in an instance named
    after the group, written to out; exits with cmd's code. `needed`: a symbol
    without whose kprobe nothing can be told."""
    tr, made = None, []
    try:
        made = kprobe_events(probes)
        if not any(p.split()[1] == needed for p in made):
            sys.exit(f"{group}: no kprobe on {needed}: nothing can be told")
        events = {f"{group}/{p.split()[0].split('/')[1]}": None for p in made}
        events.update({"lock/contention_begin": None, "lock/contention_end": None})
        tr = Ftrace(group.replace("_", "-"), events, buffer_kb=32768)
        rc = subprocess.call(cmd)
        tr.stop()
        if tr.overruns() or missed(made):
            sys.exit(f"ftrace lost events ({tr.overruns()} overruns, {missed(made)} kprobe "
                     "hits missed)")
        with open(out, "w") as f:
            for ev in tr.events():
                f.write(json.dumps(ev) + "\n")
    finally:
        if tr is not None:
            tr.remove()
        for p in made:
            kprobe_events([f"-:{group}/{p.split()[0].split('/')[1]}"])
    sys.exit(rc)


if __name__ == "__main__":
    trace(sys.argv[1], sys.argv[sys.argv.index("--") + 1:], GROUP, PROBES, "mutex_unlock")
