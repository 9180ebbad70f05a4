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


def _parse(data):
    """kallsyms' lines as offsets into its text, no object per line: (address, type
    byte, name start, name end, module start, module end), modules "" (start ==
    end) for vmlinux's. The file is ~120k lines; a str per name and field cost the
    long-lived `record` 30 MB, the text and these arrays ~7 MB."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    ok = ends > starts
    starts, ends = starts[ok], ends[ok]
    spaces = np.flatnonzero(buf == 32)
    sp = spaces[np.searchsorted(spaces, starts)]            # after the address
    width = sp - starts
    if len(width) and (width == 16).all():              # (64-bit kernels: all of ours)
        hexes = buf[starts[:, None] + np.arange(16)].tobytes().decode()
        addr = np.frombuffer(bytes.fromhex(hexes), ">u8").astype(np.uint64)
    else:
        addr = np.array([int(data[a:b], 16) for a, b in zip(starts.tolist(), sp.tolist())],
                        dtype=np.uint64)
    tabs = np.flatnonzero(buf == 9)
    t = np.searchsorted(tabs, sp)
    tab = np.where(t < len(tabs), tabs[np.minimum(t, max(len(tabs) - 1, 0))], -1) \
        if len(tabs) else np.full(len(sp), -1)
    has_mod = (tab > sp) & (tab < ends)
    name_end = np.where(has_mod, tab, ends)
    mod_start = np.where(has_mod, tab + 2, 0)               # "\t[kvm_intel]"
    mod_end = np.where(has_mod, ends - 1, 0)
    return addr, buf[sp + 1], sp + 3, name_end, mod_start, mod_end


class Kallsyms:
    def __init__(self, path="/proc/kallsyms"):
        with open(path, "rb") as f:
            self._text = f.read()
        addr, type_, ns, ne, ms, me = _parse(self._text)
        keep = np.flatnonzero(addr != 0)
        keep = keep[np.argsort(addr[keep], kind="stable")]
        self.addr, self._type = addr[keep], type_[keep]
        self._spans = np.stack([ns[keep], ne[keep], ms[keep], me[keep]]).astype(np.uint32)
        self.lock_text = self._range("__lock_text_start", "__lock_text_end")
        self.sched_text = self._range("__sched_text_start", "__sched_text_end")

    def _name(self, i):
        return self._text[self._spans[0, i]:self._spans[1, i]].decode()

    def _module(self, i):
        return self._text[self._spans[2, i]:self._spans[3, i]].decode()

    def _kind(self, i):
        return chr(self._type[i])

    # whole columns, for tests and tools (built on each read: not kept)
    @property
    def name(self):
        return [self._name(i) for i in range(len(self.addr))]

    @property
    def type(self):
        return [chr(c) for c in self._type.tolist()]

    @property
    def module(self):
        return [self._module(i) for i in range(len(self.addr))]

    def _find(self, name):
        """Indexes of the symbols of this name, in address order."""
        out, needle, at = [], f" {name}".encode(), 0
        starts = self._spans[0]
        while (at := self._text.find(needle, at)) >= 0:
            at += len(needle)
            if at == len(self._text) or self._text[at] in b"\t\n":
                out += np.flatnonzero(starts == at - len(name.encode())).tolist()
        return sorted(out)

    def _range(self, start, end):
        s, e = self._find(start), self._find(end)
        if s and e:
            return int(self.addr[s[-1]]), int(self.addr[e[-1]])
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
            mod = self._module(i)
            out.append(f"{self._name(i)}+{a - int(self.addr[i]):#x}" + (f" [{mod}]" if mod else ""))
        return out

    def is_lock_function(self, addrs):
        """True for frames inside the locking, scheduling or tracing machinery
        (not a caller)."""
        addrs, idx = self._index(addrs)
        hit = np.zeros(len(addrs), dtype=bool)
        for rng in (self.lock_text, self.sched_text):
            if rng:
                hit |= (addrs >= rng[0]) & (addrs < rng[1])
        names = {i: self._name(i) for i in set(idx.tolist()) if i >= 0}
        hit |= np.array([i >= 0 and bool(_LOCK_FN.search(names[i]) or _TRACE_FN.search(names[i]))
                         for i in idx.tolist()], dtype=bool)
        return hit

    def data_address(self, name):
        """The address of a data symbol, or None (none with CONFIG_KALLSYMS_ALL=n)."""
        hit = [i for i in self._find(name) if self._kind(i) in DATA_TYPES]
        return int(self.addr[hit[0]]) if hit else None

    def data_symbols(self, addrs, max_offset=4096):
        """Name of the data symbol holding each address, or None.

        Only data symbols count: with CONFIG_KALLSYMS_ALL=n there are none, and a
        lock in .data must not be named after the last function before it."""
        addrs, idx = self._index(addrs)
        out = []
        for a, i in zip(addrs.tolist(), idx.tolist()):
            if i >= 0 and self._kind(i) in DATA_TYPES and a - int(self.addr[i]) < max_offset \
                    and not _MARKER.search(self._name(i)):
                off = a - int(self.addr[i])
                out.append(self._name(i) + (f"+{off:#x}" if off else ""))
            else:
                out.append(None)
        return out
