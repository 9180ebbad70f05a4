"""What our BPF programs cost per run, by the kernel's own accounting (bpf_stats).

BPF_ENABLE_STATS turns run-time accounting on while its fd stays open, without
touching the kernel.bpf_stats_enabled sysctl another tool may own; the counters
then show in each program fd's fdinfo (run_time_ns, run_cnt)."""
import ctypes
import os
import platform
import struct

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


def run_stats(prog_fd):
    """(run_time_ns, run_cnt) of a program, from its fd's fdinfo."""
    fields = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


class CostWindow:
    """ns per run of each named program over a window: start() ... finish()."""

    def __init__(self, prog_fds):
        self.prog_fds = prog_fds            # {name: fd}
        self.fd = None
        self.before = None

    def start(self):
        self.fd = enable()
        self.before = {n: run_stats(fd) for n, fd in self.prog_fds.items()}
        return self.fd is not None

    def finish(self):
        """{name: {"ns_per_run", "runs"}}, or None when accounting could not be enabled."""
        if self.fd is None:
            return None
        try:
            out = {}
            for n, fd in self.prog_fds.items():
                t0, c0 = self.before[n]
                t1, c1 = run_stats(fd)
                out[n] = {"ns_per_run": (t1 - t0) / (c1 - c0) if c1 > c0 else None,
                          "runs": c1 - c0}
            return out
        finally:
            self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
