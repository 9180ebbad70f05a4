"""Compiled BPF kept between runs: what bcc compiled once, loaded again without clang.

bcc compiles the C on every run (clang and LLVM: ~0.45 s of the contention probe's
~0.6 s to attached here) and loads no compiled object. What a compile produced is
kept under CACHE_DIR: each map as the kernel created it (type, sizes, flags, its
BTF type ids), the module's BTF as the kernel holds it, and each function's
instructions with the map each of its map references names. The key is everything
that changes those: the C and every header beside it, the -D settings, the kernel
headers bcc read, bcc itself, the running kernel and its BTF. A later run with the
same key creates the maps, loads and attaches the programs with libbpf's calls (as
bcc would: its raw_tracepoint__/tracepoint__ functions attached at once, in order)
and gets a handles.Module. An entry that does not load (refused, corrupt, foreign)
is removed, and the C is compiled again (bench/README.md, "Start-up": what it saves).
"""
import base64
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import struct
import tempfile

from kvmlockprof.kernel import handles

# KVMLOCKPROF_BPF_CACHE: another directory, or "off"
CACHE_DIR = os.environ.get("KVMLOCKPROF_BPF_CACHE", "/var/cache/kvmlockprof/bpf")
FORMAT = 1
KEEP = 32                       # entries kept; the least recently used go first
BPF_LD_IMM64, BPF_PSEUDO_MAP_FD = 0x18, 1
PROG_TYPES = {"raw_tracepoint": 17, "tracepoint": 5}     # BPF_PROG_TYPE_*
# bcc's prefixes of functions it loads and attaches as it compiles (BPF._trace_autoload)
_AUTOLOAD = (b"kprobe__", b"kretprobe__", b"tracepoint__", b"raw_tracepoint__",
             b"kfunc__", b"kretfunc__", b"lsm__")
_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst/src regs, off, imm


def enabled():
    return CACHE_DIR != "off"


def _stat(path):
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    return None


def key(text, cflags, headers, bpf_dir):
    """The cache key of a compile: sha256 of everything that changes its output."""
    h = hashlib.sha256()
    spec = importlib.util.find_spec("bcc")
    parts = {"format": FORMAT, "cflags": list(cflags), "uname": list(os.uname()),
             "btf": _stat("/sys/kernel/btf/vmlinux"),
             "headers": [headers.status, headers.build, headers.source, headers.release,
                         _stat(os.path.join(headers.build or "/", ".config"))],
             "bcc": [spec.origin if spec else None,
                     _stat(spec.origin) if spec else None,
                     _stat(os.path.join(os.path.dirname(spec.origin), "version.py"))
                     if spec else None]}
    h.update(json.dumps(parts, sort_keys=True).encode())
    h.update(text.encode())
    for name in sorted(os.listdir(bpf_dir)):
        if name.endswith(".h"):
            h.update(name.encode())
            with open(os.path.join(bpf_dir, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _dir():
    """The cache directory, made if missing; None where it is not ours alone (we
    load what is in it into the kernel)."""
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        st = os.stat(CACHE_DIR)
    except OSError:
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return CACHE_DIR


def describe():
    """doctor's row: (status, detail) of the kept compiles."""
    if not enabled():
        return "off", "KVMLOCKPROF_BPF_CACHE=off: bcc compiles the C on every run (~1 s)"
    d = _dir()
    if d is None:
        return "no", (f"{CACHE_DIR} cannot be made, or others may write it: bcc compiles "
                      "the C on every run (~1 s); make it root's alone (chmod 700)")
    n = sum(e.name.endswith(".json") for e in os.scandir(d))
    return "ok", (f"{n} kept in {d}: a run with the same C, settings, kernel and bcc loads "
                  "its compile (no clang); a first run compiles (~1 s)")


def _path(k):
    d = _dir()
    return d and os.path.join(d, k + ".json")


def save(k, bpf, function_code):
    """Keep what bcc's object `bpf`, just compiled (its autoloaded functions loaded,
    nothing else yet), is made of (function_code(bpf, fn): a function's
    instructions). Returns whether it was kept: a module with
    something this cache does not rebuild (a kprobe bcc attached, a map reference
    of another kind, a map with no description) is not."""
    path = _path(k)
    if path is None:
        return False
    try:
        entry = _describe(bpf, function_code)
    except (_Unkept, OSError):
        return False
    entry["key"] = k
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
        _prune(os.path.dirname(path))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


class _Unkept(Exception):
    pass


def _describe(bpf, function_code):
    from bcc import libbcc
    lib_ = handles._typed_libbcc(libbcc.lib)
    maps, by_fd, btf_ids = [], {}, set()
    for name in handles.table_names(bpf):
        t = handles.table(bpf, name)
        if t is None:
            raise _Unkept(name)
        i = handles.info(t.map_fd, handles.MapInfo)
        m = {"name": name, "kname": i.name.decode(), "type": i.type,
             "key_size": i.key_size, "value_size": i.value_size,
             "max_entries": i.max_entries, "flags": i.map_flags,
             "map_extra": i.map_extra, "btf_key": i.btf_key_type_id,
             "btf_value": i.btf_value_type_id, "specs": list(t._specs)}
        if i.btf_value_type_id:
            btf_ids.add(i.btf_id)
        if i.type == 27:                        # BPF_MAP_TYPE_RINGBUF: what it carries
            scratch = ctypes.create_string_buffer(4096)
            m["event"] = handles.type_spec(type(bpf[name].event(scratch)))
        by_fd[t.map_fd] = name
        maps.append(m)
    if len(btf_ids) > 1:
        raise _Unkept("maps of more than one BTF")
    funcs = []
    for n in range(lib_.bpf_num_functions(bpf.module)):
        fn = lib_.bpf_function_name(bpf.module, n)
        code = function_code(bpf, fn)
        refs = []
        for at, (op, regs, _, imm) in enumerate(_INSN.iter_unpack(code)):
            # (a 16-byte load's second half has op 0: never taken for one)
            if op != BPF_LD_IMM64 or not regs >> 4:
                continue
            if regs >> 4 != BPF_PSEUDO_MAP_FD:
                raise _Unkept(f"{fn}: a map reference of kind {regs >> 4}")
            if imm not in by_fd:
                raise _Unkept(f"{fn}: map fd {imm} is none of the module's")
            refs.append([at, by_fd[imm]])
        f = {"name": fn.decode(), "code": base64.b64encode(code).decode(), "maps": refs}
        if fn.startswith(_AUTOLOAD):
            if fn.startswith(b"raw_tracepoint__"):
                f["attach"] = ["raw_tracepoint", fn[len(b"raw_tracepoint__"):].decode()]
            elif fn.startswith(b"tracepoint__"):
                f["attach"] = ["tracepoint", fn[len(b"tracepoint__"):].replace(
                    b"__", b":", 1).decode()]
            else:
                raise _Unkept(f"{fn}: attached by bcc as it compiled")
            if fn not in bpf.funcs:
                raise _Unkept(f"{fn}: not loaded by bcc")
            f["kname"] = handles.info(bpf.funcs[fn].fd, handles.ProgInfo).name.decode()
        funcs.append(f)
    return {"format": FORMAT, "license": libbcc.lib.bpf_module_license(bpf.module).decode(),
            "btf": base64.b64encode(handles.btf_data(btf_ids.pop())).decode()
            if btf_ids else "", "maps": maps, "funcs": funcs}


def _prune(d):
    entries = [e for e in os.scandir(d) if e.name.endswith(".json")]
    for e in sorted(entries, key=lambda e: e.stat().st_mtime)[:max(len(entries) - KEEP, 0)]:
        with contextlib.suppress(OSError):
            os.unlink(e.path)


class CachedModule(handles.Module):
    """A handles.Module made from a kept compile: its maps created, its autoloaded
    functions loaded and attached; the others' instructions kept (`code`) for
    load_func."""

    def __init__(self, entry):
        super().__init__({}, {}, ({}, {}, {}, {}, {}), os.getpid())
        self.license = entry["license"].encode()
        self.code = {}
        try:
            self._open(entry)
        except BaseException:
            self.cleanup()
            raise

    def _open(self, entry):
        btf_fd = handles.load_btf(base64.b64decode(entry["btf"])) if entry["btf"] else 0
        try:
            fds = {}
            for m in entry["maps"]:
                fd = handles.create_map(m["type"], m["kname"], m["key_size"],
                                        m["value_size"], m["max_entries"], m["flags"],
                                        m["map_extra"], btf_fd, m["btf_key"], m["btf_value"])
                fds[m["name"]] = fd
                t = handles.Table(m["name"], fd, m["type"], m["max_entries"],
                                  *(_spec(s) for s in m["specs"]))
                if "event" in m:
                    t.event_type = handles.build_type(_spec(m["event"]))
                self.tables[m["name"]] = t
        finally:
            if btf_fd:
                os.close(btf_fd)
        for f in entry["funcs"]:
            code = bytearray(base64.b64decode(f["code"]))
            for at, name in f["maps"]:
                op, regs, off, _ = _INSN.unpack_from(code, at * 8)
                if op != BPF_LD_IMM64 or regs >> 4 != BPF_PSEUDO_MAP_FD:
                    raise ValueError(f"{f['name']}: instruction {at} is no map reference")
                _INSN.pack_into(code, at * 8, op, regs, off, fds[name])
            self.code[f["name"].encode()] = bytes(code)
            if "attach" in f:
                kind, target = f["attach"]
                self.load_func(f["name"], PROG_TYPES[kind], f["kname"])
                if kind == "raw_tracepoint":
                    self.attach_raw_tracepoint(target, f["name"])
                else:
                    self.attach_tracepoint(target, f["name"])

    def load_func(self, fn, prog_type, kname=None, code=None):
        """Load a kept function (or these instructions of it: bpfload.load_func's,
        its kfunc calls made the kernel's) as a program of this type: its
        handles.Function."""
        fn = handles._bytes(fn)
        if fn in self.funcs:
            return self.funcs[fn]
        fd = handles.load_prog(prog_type, kname or fn, code or self.code[fn], self.license)
        self.funcs[fn] = handles.Function(fn, fd)
        return self.funcs[fn]


def _spec(s):
    """A type spec as JSON gives it back (tuples as lists)."""
    if s[0] == "array":
        return ("array", _spec(s[1]), s[2])
    if s[0] == "simple":
        return ("simple", s[1])
    kind, name, pack, anon, fields = s
    return (kind, name, pack, list(anon), [(f[0], _spec(f[1]), *f[2:]) for f in fields])


def load(k):
    """The kept compile of key k, loaded (a CachedModule), or None: none kept, or it
    did not load (then it is removed)."""
    path = _path(k)
    if path is None:
        return None
    try:
        with open(path) as f:
            entry = json.load(f)
        if entry.get("format") != FORMAT or entry.get("key") != k:
            raise ValueError("a foreign entry")
        module = CachedModule(entry)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)                  # (recently used: kept by _prune)
    return module
