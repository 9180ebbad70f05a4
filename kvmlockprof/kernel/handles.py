"""A loaded BPF module held by its fds alone, read and detached through libbpf.

bcc compiles and loads in a child process (kernel/handover.py); the process that
records gets the module's fds and this stand-in for bcc's BPF object, with the part
of its interface a session uses after loading (tables, program fds, detaching, a
raw tracepoint attached again). libbpf.so.1 is bcc's own dependency and maps in
under a MB; libbcc maps in LLVM, ~60 MB resident before it compiles anything. The
kernel frees everything when the last fd closes: a killed process leaves nothing.
"""
import contextlib
import ctypes as ct
import errno
import fcntl
import os
import platform
import struct

from kvmlockprof.kernel import host, tracefs

# union bpf_attr's map types (include/uapi/linux/bpf.h) that hold a value per CPU
PERCPU_TYPES = {5, 6, 10, 21}          # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, ..._STORAGE
ARRAY_TYPES = {2, 6}                   # ARRAY, PERCPU_ARRAY: every key exists

_LIB = None


def lib():
    """libbpf, its calls typed (returns 0 or -errno, errno set)."""
    global _LIB
    if _LIB is None:
        b = ct.CDLL("libbpf.so.1", use_errno=True)
        vp, i = ct.c_void_p, ct.c_int
        for name, args in {"bpf_map_lookup_elem": [i, vp, vp],
                           "bpf_map_update_elem": [i, vp, vp, ct.c_uint64],
                           "bpf_map_delete_elem": [i, vp],
                           "bpf_map_get_next_key": [i, vp, vp],
                           "bpf_map_lookup_and_delete_elem": [i, vp, vp],
                           "bpf_map_lookup_batch": [i, vp, vp, vp, vp, vp, vp],
                           "bpf_raw_tracepoint_open": [ct.c_char_p, i],
                           "bpf_prog_test_run_opts": [i, vp],
                           "bpf_prog_load": [i, ct.c_char_p, ct.c_char_p, vp, ct.c_size_t,
                                             vp],
                           "bpf_map_create": [i, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                              ct.c_uint32, vp],
                           "bpf_btf_load": [vp, ct.c_size_t, vp],
                           "bpf_btf_get_fd_by_id": [ct.c_uint32],
                           "bpf_obj_get_info_by_fd": [i, vp, vp]}.items():
            f = getattr(b, name)
            f.argtypes, f.restype = args, i
        _LIB = b
    return _LIB


class _TestRunOpts(ct.Structure):
    """libbpf's struct bpf_test_run_opts (bpf.h, libbpf 1.x)."""
    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


class _ProgLoadOpts(ct.Structure):
    """libbpf's struct bpf_prog_load_opts (bpf.h, libbpf 1.0-1.1: up to log_buf)."""
    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int),
                ("expected_attach_type", ct.c_int), ("prog_btf_fd", ct.c_uint32),
                ("prog_flags", ct.c_uint32), ("prog_ifindex", ct.c_uint32),
                ("kern_version", ct.c_uint32), ("attach_btf_id", ct.c_uint32),
                ("attach_prog_fd", ct.c_uint32), ("attach_btf_obj_fd", ct.c_uint32),
                ("fd_array", ct.c_void_p), ("func_info", ct.c_void_p),
                ("func_info_cnt", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("line_info", ct.c_void_p), ("line_info_cnt", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("log_level", ct.c_uint32),
                ("log_size", ct.c_uint32), ("log_buf", ct.c_void_p)]


BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP = 26, 23     # include/uapi/linux/bpf.h


def load_prog(prog_type, name, code, license=b"GPL", expected_attach_type=0,
              attach_btf_id=0):
    """Load instructions as a program of this type (libbpf's bpf_prog_load): its fd,
    or OSError with the verifier's last lines (asked for again with its log only
    where it refused: a whole log costs the verifier time)."""
    buf, err = ct.create_string_buffer(bytes(code), len(code)), 0
    for log in (None, ct.create_string_buffer(1 << 20)):
        opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts),
                             expected_attach_type=expected_attach_type,
                             attach_btf_id=attach_btf_id)
        if log is not None:
            opts.log_level, opts.log_size, opts.log_buf = 1, len(log), ct.addressof(log)
        fd = lib().bpf_prog_load(prog_type, _bytes(name)[:15], license, buf,
                                 len(code) // 8, ct.byref(opts))
        if fd >= 0:
            return fd
        err = err or ct.get_errno()
    why = " ".join(log.value.decode(errors="replace").strip().splitlines()[-2:])
    raise OSError(err, f"loading {_bytes(name).decode()}: {os.strerror(err)}"
                  + (f": {why}" if why else ""))


def load_tp_btf(name, code, btf_id, license=b"GPL"):
    """Load instructions as a tp_btf program (BPF_PROG_TYPE_TRACING on the raw
    tracepoint whose btf_trace_ typedef is `btf_id`), which bcc 0.26 cannot: its fd,
    or OSError with the verifier's last lines."""
    return load_prog(BPF_PROG_TYPE_TRACING, name, code, license,
                     expected_attach_type=BPF_TRACE_RAW_TP, attach_btf_id=btf_id)


class MapInfo(ct.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h), as far as map_extra."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("ifindex", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("map_extra", ct.c_uint64)]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info, as far as its name."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_ubyte * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16)]


class _BtfInfo(ct.Structure):
    _fields_ = [("btf", ct.c_uint64), ("btf_size", ct.c_uint32), ("id", ct.c_uint32),
                ("name", ct.c_uint64), ("name_len", ct.c_uint32), ("kernel_btf", ct.c_uint32)]


class _MapCreateOpts(ct.Structure):
    """libbpf's struct bpf_map_create_opts (bpf.h, libbpf 1.0-1.1)."""
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("map_extra", ct.c_uint64),
                ("numa_node", ct.c_uint32), ("map_ifindex", ct.c_uint32)]


def info(fd, kind):
    """The kernel's bpf_*_info of a map (MapInfo) or program (ProgInfo) fd."""
    out = kind()
    n = ct.c_uint32(ct.sizeof(out))
    if lib().bpf_obj_get_info_by_fd(fd, ct.byref(out), ct.byref(n)) < 0:
        raise _oserror("reading a BPF object's info")
    return out


def btf_data(btf_id):
    """The raw BTF of a loaded BTF object (a module's: what its maps' type ids mean)."""
    fd = lib().bpf_btf_get_fd_by_id(btf_id)
    if fd < 0:
        raise _oserror(f"opening BTF object {btf_id}")
    try:
        meta = _BtfInfo()
        n = ct.c_uint32(ct.sizeof(meta))
        if lib().bpf_obj_get_info_by_fd(fd, ct.byref(meta), ct.byref(n)) < 0:
            raise _oserror("reading a BTF object's size")
        buf = ct.create_string_buffer(meta.btf_size)
        meta = _BtfInfo(btf=ct.addressof(buf), btf_size=len(buf))
        if lib().bpf_obj_get_info_by_fd(fd, ct.byref(meta), ct.byref(n)) < 0:
            raise _oserror("reading a BTF object")
        return buf.raw[:meta.btf_size]
    finally:
        os.close(fd)


def load_btf(data):
    """Load raw BTF: its fd."""
    buf = ct.create_string_buffer(data, len(data))
    fd = lib().bpf_btf_load(buf, len(data), None)
    if fd < 0:
        raise _oserror("loading BTF")
    return fd


def create_map(map_type, name, key_size, value_size, max_entries, flags=0, map_extra=0,
               btf_fd=0, btf_key=0, btf_value=0):
    """A new map (libbpf's bpf_map_create): its fd."""
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags,
                          map_extra=map_extra)
    if btf_fd and btf_value:
        opts.btf_fd, opts.btf_key_type_id, opts.btf_value_type_id = btf_fd, btf_key, btf_value
    fd = lib().bpf_map_create(map_type, _bytes(name)[:15], key_size, value_size,
                              max_entries, ct.byref(opts))
    if fd < 0:
        raise _oserror(f"creating map {name}")
    return fd


def attach_tp_btf(prog_fd):
    """Attach a tp_btf program to its tracepoint: the link's fd."""
    fd = lib().bpf_raw_tracepoint_open(None, prog_fd)
    if fd < 0:
        raise _oserror("attaching a tp_btf program")
    return fd


def run_raw_tracepoint(prog_fd, args):
    """Run a raw tracepoint program once, here, with these u64 arguments
    (BPF_PROG_TEST_RUN, 5.10+); its return value."""
    ctx = (ct.c_uint64 * len(args))(*args)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), ctx_in=ct.addressof(ctx),
                        ctx_size_in=ct.sizeof(ctx))
    if lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)) < 0:
        raise _oserror("running a BPF program (BPF_PROG_TEST_RUN)")
    return opts.retval


def _oserror(what):
    err = ct.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# ---- ctypes types across the process boundary --------------------------------------

_SIMPLE = {t._type_: t for t in (
    ct.c_char, ct.c_byte, ct.c_ubyte, ct.c_short, ct.c_ushort, ct.c_int, ct.c_uint,
    ct.c_long, ct.c_ulong, ct.c_longlong, ct.c_ulonglong, ct.c_float, ct.c_double,
    ct.c_bool, ct.c_void_p, ct.c_char_p)}


def type_spec(t):
    """A picklable description of a ctypes type bcc built from the C (build_type's)."""
    if isinstance(t, type) and issubclass(t, ct.Array):
        return ("array", type_spec(t._type_), t._length_)
    if isinstance(t, type) and issubclass(t, (ct.Structure, ct.Union)):
        return ("union" if issubclass(t, ct.Union) else "struct", t.__name__,
                getattr(t, "_pack_", 0), list(getattr(t, "_anonymous_", ())),
                [(f[0], type_spec(f[1]), *f[2:]) for f in t._fields_])
    return ("simple", t._type_)


def build_type(spec):
    if spec[0] == "array":
        return build_type(spec[1]) * spec[2]
    if spec[0] == "simple":
        return _SIMPLE[spec[1]]
    kind, name, pack, anon, fields = spec
    ns = {"_anonymous_": anon, "_fields_": [(f[0], build_type(f[1]), *f[2:]) for f in fields]}
    if pack:
        ns["_pack_"] = pack
    return type(name, (ct.Union if kind == "union" else ct.Structure,), ns)


# ---- fds renumbered on their way over (handover) -----------------------------------

REMAP = {}          # child's fd -> ours, while a handed-over module is unpickled


def _bytes(name):
    """bcc's keys are bytes; the probes' code passes str or bytes."""
    return name.encode() if isinstance(name, str) else name


def remap(fd):
    """Ours for a child's fd, while a handover unpickles (an fd it did not send is an
    error: never some other file of ours); outside one, the fd itself."""
    return REMAP[fd] if REMAP else fd


class Function:
    def __init__(self, name, fd):
        self.name, self.fd = name, fd

    def __reduce__(self):
        return Function, (self.name, self.fd)


class Table:
    """A map by its fd, with bcc's table interface as a session uses it: Key and Leaf
    (ctypes, as bcc parsed them; a per-CPU map's Leaf is sLeaf per possible CPU),
    t[key], t[key] = leaf, del t[key], get, items, getvalue, len."""

    def __init__(self, name, fd, map_type, max_entries, key_spec, leaf_spec):
        self.name, self.map_fd, self.map_type = name, fd, map_type
        self.max_entries = max_entries
        self._specs = (key_spec, leaf_spec)
        self.Key = build_type(key_spec)
        self.sLeaf = self.Leaf = build_type(leaf_spec)
        if map_type in PERCPU_TYPES:        # (each CPU's value padded to 8 bytes)
            n, pad = len(host.cpu_ids("possible")), -ct.sizeof(self.sLeaf) % 8
            self.Leaf = (type("percpu", (ct.Structure,), {"_fields_": [
                ("v", self.sLeaf), ("pad", ct.c_ubyte * pad)]}) if pad else self.sLeaf) * n
            self._padded = bool(pad)

    def __getstate__(self):
        return (self.name, self.map_fd, self.map_type, self.max_entries, *self._specs)

    def __setstate__(self, state):
        name, fd, *rest = state
        self.__init__(name, remap(fd), *rest)

    def _key(self, key):
        return self.Key(key) if isinstance(key, int) else key

    def __getitem__(self, key):
        leaf = self.get(key)
        if leaf is None:
            raise KeyError(key)
        return leaf

    def get(self, key, default=None):
        leaf = self.Leaf()
        if lib().bpf_map_lookup_elem(self.map_fd, ct.byref(self._key(key)), ct.byref(leaf)):
            return default
        return leaf

    def getvalue(self, key):
        """A per-CPU map's values, one a CPU."""
        leaf = self[key]
        return [x.v for x in leaf] if getattr(self, "_padded", False) else leaf

    def __setitem__(self, key, leaf):
        if lib().bpf_map_update_elem(self.map_fd, ct.byref(self._key(key)),
                                     ct.byref(leaf), 0):
            raise _oserror(f"updating BPF map {self.name}")

    def __delitem__(self, key):
        if self.map_type in ARRAY_TYPES:        # (an array's entry is zeroed, as bcc does)
            self[key] = self.Leaf()
        elif lib().bpf_map_delete_elem(self.map_fd, ct.byref(self._key(key))):
            raise KeyError(key)

    def lookup_and_delete(self, key):
        """Its value, deleted in the same call, or None (absent, or a hash before 5.14)."""
        leaf = self.Leaf()
        if lib().bpf_map_lookup_and_delete_elem(self.map_fd, ct.byref(self._key(key)),
                                                ct.byref(leaf)):
            return None
        return leaf

    def keys(self):
        if self.map_type in ARRAY_TYPES:
            return [self.Key(i) for i in range(self.max_entries)]
        out, key, nxt = [], None, self.Key()
        while lib().bpf_map_get_next_key(self.map_fd, None if key is None else ct.byref(key),
                                         ct.byref(nxt)) == 0:
            out.append(nxt)
            key, nxt = nxt, self.Key()
        return out

    def items(self):
        return [(k, v) for k in self.keys() if (v := self.get(k)) is not None]

    def __len__(self):
        return self.max_entries if self.map_type in ARRAY_TYPES else len(self.keys())


# perf_event_open for a tracepoint, as bcc attaches one (bpf_attach_tracepoint)
_PERF_OPEN = {"x86_64": 298, "aarch64": 241}
_IOC_SET_BPF, _IOC_ENABLE, _IOC_DISABLE = 0x40042408, 0x2400, 0x2401


def _close_perf_event(fd):
    """As bcc closes one (bpf_close_perf_event_fd): disabled first."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, _IOC_DISABLE, 0)
    os.close(fd)


def _perf_tracepoint(prog_fd, category, event):
    with open(f"{tracefs.tracefs_path()}/events/{category}/{event}/id") as f:
        tp_id = int(f.read())
    attr = ct.create_string_buffer(struct.pack("IIQQ", 2, 64, tp_id, 1).ljust(64, b"\0"))
    struct.pack_into("I", attr, 48, 1)                  # wakeup_events
    fd = ct.CDLL(None, use_errno=True).syscall(
        _PERF_OPEN[platform.machine()], attr, -1, 0, -1, 8)     # PERF_FLAG_FD_CLOEXEC
    if fd < 0:
        raise _oserror(f"perf_event_open {category}:{event}")
    try:
        fcntl.ioctl(fd, _IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, _IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


class Module:
    """A bcc BPF object after loading, as fds: tables, funcs, and the attachments in
    bcc's own dicts (their names as bcc keys them), so the probes' code reads it as
    it reads bcc's."""

    def __init__(self, tables, funcs, attached, loader_pid):
        self.tables = tables                # {name: Table}
        self.funcs = funcs                  # {bytes name: Function}
        self.raw_tracepoint_fds, self.tracepoint_fds, self.kprobe_fds, \
            self.kfunc_entry_fds, self.kfunc_exit_fds = attached
        self.loader_pid = loader_pid        # named bcc's tracefs kprobe events, if any

    @classmethod
    def from_bcc(cls, bpf):
        """In the loading process: bcc's BPF object described by its fds."""
        tables = {n: t for n in table_names(bpf) if (t := table(bpf, n)) is not None}
        funcs = {n: Function(n, f.fd) for n, f in bpf.funcs.items()}
        attached = (dict(bpf.raw_tracepoint_fds), dict(bpf.tracepoint_fds),
                    {e: dict(v) for e, v in bpf.kprobe_fds.items()},
                    dict(bpf.kfunc_entry_fds), dict(bpf.kfunc_exit_fds))
        return cls(tables, funcs, attached, os.getpid())

    def handed(self):
        """This module as a plain Module (what a handover passes)."""
        if type(self) is Module:
            return self
        return Module(self.tables, self.funcs, (
            self.raw_tracepoint_fds, self.tracepoint_fds, self.kprobe_fds,
            self.kfunc_entry_fds, self.kfunc_exit_fds), self.loader_pid)

    def fds(self):
        """Every fd it holds (what a handover passes)."""
        out = [t.map_fd for t in self.tables.values()] + [f.fd for f in self.funcs.values()]
        out += [*self.raw_tracepoint_fds.values(), *self.tracepoint_fds.values(),
                *self.kfunc_entry_fds.values(), *self.kfunc_exit_fds.values()]
        out += [fd for v in self.kprobe_fds.values() for fd in v.values()]
        return out

    def __getstate__(self):
        return vars(self)

    def __setstate__(self, state):
        vars(self).update(state)
        for name in ("raw_tracepoint_fds", "tracepoint_fds", "kfunc_entry_fds",
                     "kfunc_exit_fds"):
            setattr(self, name, {k: remap(fd) for k, fd in getattr(self, name).items()})
        self.kprobe_fds = {e: {f: remap(fd) for f, fd in v.items()}
                           for e, v in self.kprobe_fds.items()}
        self.funcs = {n: Function(n, remap(f.fd)) for n, f in self.funcs.items()}

    def __getitem__(self, name):
        return self.tables[name.decode() if isinstance(name, bytes) else name]

    def _fn(self, fn_name):
        name = _bytes(fn_name)
        if name not in self.funcs:
            raise KeyError(f"{name.decode()}: not loaded before the handover")
        return self.funcs[name].fd

    def attach_raw_tracepoint(self, tp, fn_name):
        tp = _bytes(tp)
        if tp in self.raw_tracepoint_fds:
            raise ValueError(f"raw tracepoint {tp.decode()} is attached already")
        fd = lib().bpf_raw_tracepoint_open(tp, self._fn(fn_name))
        if fd < 0:
            raise _oserror(f"attaching to raw tracepoint {tp.decode()}")
        self.raw_tracepoint_fds[tp] = fd

    def detach_raw_tracepoint(self, tp):
        os.close(self.raw_tracepoint_fds.pop(_bytes(tp)))

    def attach_tracepoint(self, tp, fn_name):
        tp = _bytes(tp)
        if tp in self.tracepoint_fds:
            raise ValueError(f"tracepoint {tp.decode()} is attached already")
        cat, _, ev = tp.decode().partition(":")
        self.tracepoint_fds[tp] = _perf_tracepoint(self._fn(fn_name), cat, ev)

    def detach_tracepoint(self, tp):
        _close_perf_event(self.tracepoint_fds.pop(_bytes(tp)))

    def _detach_probe(self, prefix, event, fn_name):
        event, fn = _bytes(event), _bytes(fn_name)
        ev = prefix + event.replace(b"+", b"_").replace(b".", b"_")
        fds = self.kprobe_fds.get(ev)
        if not fds or fn not in fds:
            raise KeyError(f"{ev.decode()} is not attached")
        _close_perf_event(fds.pop(fn))
        if not fds:
            del self.kprobe_fds[ev]
            _remove_kprobe_event(f"{ev.decode()}_bcc_{self.loader_pid}")

    def detach_kprobe(self, event, fn_name):
        self._detach_probe(b"p_", event, fn_name)

    def detach_kretprobe(self, event, fn_name):
        self._detach_probe(b"r_", event, fn_name)

    def detach_kfunc(self, fn_name):
        os.close(self.kfunc_entry_fds.pop(fn_name))

    def detach_kretfunc(self, fn_name):
        os.close(self.kfunc_exit_fds.pop(fn_name))

    def cleanup(self):
        """Close everything, each fd once whatever fails: the attachments first (the
        firing stops), then the programs and maps."""
        closes = [(os.close, fd) for fd in self.raw_tracepoint_fds.values()]
        closes += [(_close_perf_event, fd) for fd in self.tracepoint_fds.values()]
        closes += [(_close_perf_event, fd) for v in self.kprobe_fds.values()
                   for fd in v.values()]
        closes += [(os.close, fd) for d in (self.kfunc_entry_fds, self.kfunc_exit_fds)
                   for fd in d.values()]
        closes += [(os.close, fd) for fd in {*(f.fd for f in self.funcs.values()),
                                             *(t.map_fd for t in self.tables.values())}]
        events = [f"{ev.decode()}_bcc_{self.loader_pid}" for ev in self.kprobe_fds]
        for d in (self.raw_tracepoint_fds, self.tracepoint_fds, self.kprobe_fds,
                  self.kfunc_entry_fds, self.kfunc_exit_fds):
            d.clear()
        self.funcs, self.tables = {}, {}
        errors = []
        for close, fd in closes:
            try:
                close(fd)
            except OSError as e:
                errors.append(e)
        for name in events:
            try:
                _remove_kprobe_event(name)
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _typed_libbcc(lib_):
    lib_.bpf_table_name.restype = ct.c_char_p        # (bcc leaves it int)
    lib_.bpf_num_tables.argtypes = [ct.c_void_p]
    lib_.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]
    return lib_


def table_names(bpf):
    """The names of a bcc BPF object's maps, in its order."""
    from bcc import libbcc
    lib_ = _typed_libbcc(libbcc.lib)
    return [lib_.bpf_table_name(bpf.module, i).decode()
            for i in range(lib_.bpf_num_tables(bpf.module))]


def table(bpf, name):
    """A map of a module as a Table: a handed-over Module's own, or one built from a
    bcc BPF object's descriptions (a map bcc's table classes do not take, such as
    task storage), or None for a map without a key or value description."""
    if isinstance(bpf, Module):
        return bpf[name]
    import json
    from bcc import libbcc
    lib_, bname = _typed_libbcc(libbcc.lib), name.encode()
    desc = [json.loads(d(bpf.module, bname).decode() or "null")
            for d in (lib_.bpf_table_key_desc, lib_.bpf_table_leaf_desc)]
    if None in desc:
        return None                     # (queues and stacks: none of ours)
    map_id = lib_.bpf_table_id(bpf.module, bname)
    return Table(name, lib_.bpf_table_fd(bpf.module, bname),
                 lib_.bpf_table_type_id(bpf.module, map_id),
                 lib_.bpf_table_max_entries_id(bpf.module, map_id),
                 *(type_spec(bpf._decode_table_type(d)) for d in desc))


def _remove_kprobe_event(name):
    """bcc's tracefs kprobe event of this name, if it made one (kernels without the
    kprobe PMU): the PMU's kprobes go with their fd."""
    path = f"{tracefs.tracefs_path()}/kprobe_events"
    try:
        with open(path) as f:
            if not any(line.split()[0].endswith("/" + name) for line in f if line.strip()):
                return
        with open(path, "a") as f:
            f.write(f"-:kprobes/{name}\n")
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY):
            raise
