"""Kernel symbol resolution from /proc/kallsyms, vectorised over address arrays."""
import re

from kvmlockprof.lazy import np

DATA_TYPES = set("dDbBrR")
# Linker markers, not objects: an address past one is in some unnamed object.
_MARKER = re.compile(r"^(__start|__stop|__end|_s|_e)[a-z_]|_(start|end)$")
# Lock slow paths that live outside .spinlock.text/.sched.text.
_LOCK_FN = re.compile(r"(_slowpath|^__?(mutex|rwsem|rt_mutex|down|up|percpu_down|percpu_up)"
                      r"|^_raw_|^queued_|^__pv_queued|^osq_lock|^rwbase_|^__rt_mutex"
                      r"|^(do_raw|native_queued)_)")
# The tracing machinery between a lock and the program that walked its stack:
# which of these frames a stack has depends on what else is attached (one
# consumer: the static call runs it directly; two: through __traceiter_*).
_TRACE_FN = re.compile(r"^(bpf_prog_|bpf_trace_run|__bpf_trace_|__traceiter_|perf_trace_"
                       r"|trace_event_raw_event_|perf_tp_event|trace_call_bpf|__probestub_"
                       r"|__SCT__|bpf_get_stack)")


_LINE = re.compile(rb"^([0-9a-f]+) (\S) (\S+)(?:\t\[(\S+)\])?$", re.M)


def read(path="/proc/kallsyms"):
    """/proc/kallsyms as arrays: addr (0 without privileges), type, name, module ("" for
    vmlinux's). One regular expression, no table library: `record` reads it after the
    probes attach, in a process that keeps it for its life."""
    with open(path, "rb") as f:
        rows = _LINE.findall(f.read())
    addr = np.array([int(r[0], 16) for r in rows], dtype=np.uint64)
    strs = [np.array([r[i].decode() for r in rows], dtype=object) for i in (1, 2, 3)]
    return (addr, *strs)


_TEXT = re.compile(rb"^\S+ [tTwW] (\S+)(?:\t\[(\S+)\])?$", re.M)


def text_symbols(path="/proc/kallsyms"):
    """The kernel's text symbols: {name: module}, module "" for vmlinux (the first
    of a name that several modules define). One regular expression over the file:
    a quarter of the time of reading it into a table, before the probes attach."""
    with open(path, "rb") as f:
        data = f.read()
    out = {}
    for name, module in _TEXT.findall(data):
        out.setdefault(name.decode(), module.decode())
    return out


class Kallsyms:
    def __init__(self, path="/proc/kallsyms"):
        addr, type_, name, module = read(path)
        keep = np.flatnonzero(addr != 0)
        keep = keep[np.argsort(addr[keep], kind="stable")]
        self.addr, self.type, self.name, self.module = (
            a[keep] for a in (addr, type_, name, module))
        by_name = dict(zip(self.name.tolist(), self.addr.tolist()))
        self.lock_text = self._range(by_name, "__lock_text_start", "__lock_text_end")
        self.sched_text = self._range(by_name, "__sched_text_start", "__sched_text_end")

    @staticmethod
    def _range(by_name, start, end):
        if start in by_name and end in by_name:
            return int(by_name[start]), int(by_name[end])
        return None

    def _index(self, addrs):
        addrs = np.asarray(addrs, dtype=np.uint64)
        return addrs, np.searchsorted(self.addr, addrs, side="right") - 1

    def frames(self, addrs):
        """'sym+0xoff [module]' per address (the address itself when unknown)."""
        addrs, idx = self._index(addrs)
        out = []
        for a, i in zip(addrs.tolist(), idx.tolist()):
            if i < 0:
                out.append(f"{a:#x}")
                continue
            mod = self.module[i]
            out.append(f"{self.name[i]}+{a - int(self.addr[i]):#x}" + (f" [{mod}]" if mod else ""))
        return out

    def is_lock_function(self, addrs):
        """True for frames inside the locking, scheduling or tracing machinery
        (not a caller)."""
        addrs, idx = self._index(addrs)
        hit = np.zeros(len(addrs), dtype=bool)
        for rng in (self.lock_text, self.sched_text):
            if rng:
                hit |= (addrs >= rng[0]) & (addrs < rng[1])
        names = np.where(idx >= 0, self.name[np.maximum(idx, 0)], "")
        hit |= np.array([bool(_LOCK_FN.search(n) or _TRACE_FN.search(n)) for n in names],
                        dtype=bool)
        return hit

    def data_address(self, name):
        """The address of a data symbol, or None (none with CONFIG_KALLSYMS_ALL=n)."""
        hit = (self.name == name) & np.isin(self.type, list(DATA_TYPES))
        return int(self.addr[hit][0]) if hit.any() else None

    def data_symbols(self, addrs, max_offset=4096):
        """Name of the data symbol holding each address, or None.

        Only data symbols count: with CONFIG_KALLSYMS_ALL=n there are none, and a
        lock in .data must not be named after the last function before it."""
        addrs, idx = self._index(addrs)
        out = []
        for a, i in zip(addrs.tolist(), idx.tolist()):
            if i >= 0 and self.type[i] in DATA_TYPES and a - int(self.addr[i]) < max_offset \
                    and not _MARKER.search(self.name[i]):
                off = a - int(self.addr[i])
                out.append(self.name[i] + (f"+{off:#x}" if off else ""))
            else:
                out.append(None)
        return out
