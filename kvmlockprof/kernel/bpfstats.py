"""What our BPF objects cost, by the kernel's own accounting: each program's time
per run (bpf_stats) and each map's memory (memlock).

BPF_ENABLE_STATS turns run-time accounting on while its fd stays open, without
touching the kernel.bpf_stats_enabled sysctl another tool may own; the counters
then show in each program fd's fdinfo (run_time_ns, run_cnt). A map fd's fdinfo
has the bytes the kernel charges for it (memlock: what bpftool prints), per-CPU
copies included."""
import ctypes
import os
import platform
import struct
import time

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS, _BPF_STATS_RUN_TIME = 32, 0
_ATTR_SIZE = 128                    # union bpf_attr, zero-padded


def enable():
    """An fd that keeps run-time accounting on until closed, or None (kernel < 5.8)."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return None
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("I", attr, 0, _BPF_STATS_RUN_TIME)
    fd = ctypes.CDLL(None, use_errno=True).syscall(nr, _BPF_ENABLE_STATS, attr, _ATTR_SIZE)
    return fd if fd >= 0 else None


def _fdinfo(fd):
    fields = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def run_stats(prog_fd):
    """(run_time_ns, run_cnt) of a program, from its fd's fdinfo."""
    fields = _fdinfo(prog_fd)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


# The counter, in each probe's, of the runs the kernel skipped (recursion_misses)
RECURSION = "lost_recursion"


def recursion_misses(prog_fd):
    """Runs of a program the kernel skipped because it (or, for a kprobe, any kprobe
    program) was already running on that CPU (its event fired inside it, e.g. in an
    interrupt it took): fdinfo, 5.12+."""
    return int(_fdinfo(prog_fd).get("recursion_misses", 0))


def map_memory(bpf):
    """{map name: bytes the kernel charges for it} of every map of a module (bcc's BPF
    object or a handed-over handles.Module)."""
    from kvmlockprof.kernel import handles
    tables = bpf.tables if isinstance(bpf, handles.Module) else \
        {n: handles.table(bpf, n) for n in handles.table_names(bpf)}
    return {n: int(_fdinfo(t.map_fd).get("memlock", 0)) for n, t in tables.items()
            if t is not None}


class CostWindow:
    """ns per run of each named program over a window: start() ... finish()."""

    def __init__(self, prog_fds):
        self.prog_fds = prog_fds            # {name: fd}
        self.fd = None
        self.before = None

    def start(self):
        self.fd = enable()
        self.before = {n: run_stats(fd) for n, fd in self.prog_fds.items()}
        self.t0 = time.monotonic()
        return self.fd is not None

    def runs(self):
        """Runs of all its programs so far in the window."""
        return sum(run_stats(fd)[1] - self.before[n][1] for n, fd in self.prog_fds.items())

    def finish(self):
        """{name: {"ns_per_run", "runs", "ns"}}, or None when accounting could not be
        enabled; self.seconds: how long the window was."""
        if self.fd is None:
            return None
        try:
            out = {}
            self.seconds = time.monotonic() - self.t0
            for n, fd in self.prog_fds.items():
                t0, c0 = self.before[n]
                t1, c1 = run_stats(fd)
                out[n] = {"ns_per_run": (t1 - t0) / (c1 - c0) if c1 > c0 else None,
                          "runs": c1 - c0, "ns": t1 - t0}
            return out
        finally:
            self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
