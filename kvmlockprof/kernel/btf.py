"""Struct layouts of the running kernel, from its BTF (/sys/kernel/btf/).

BPF programs here never take an offset from headers (the fallback headers can be
years older than the kernel): every field they read reaches the C as a define
computed here. KVM may be a module, so module BTF under /sys/kernel/btf/ counts.

The BTF is read as the kernel writes it (include/uapi/linux/btf.h, a stable format):
the raw bytes are kept (~5 MB) and a type is decoded when asked for, in the shape
bpftool's JSON gives it. bpftool's JSON dump, parsed whole, held ~120 MB of Python
objects for the life of a `record` or an exporter; tests/test_btf.py checks every
type decoded here against bpftool's.
"""
import functools
import hashlib
import json
import os
import platform
import struct
from array import array

from kvmlockprof.kernel import host

BTF_DIR = "/sys/kernel/btf"
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


# Types a contended lock can be (lock:contention_begin's lock argument points at one).
LOCK_TYPES = {"spinlock_t", "raw_spinlock_t", "rwlock_t", "spinlock", "raw_spinlock",
              "mutex", "rw_semaphore", "rt_mutex", "rt_mutex_base", "percpu_rw_semaphore",
              "qspinlock", "qrwlock", "arch_spinlock_t", "arch_rwlock_t", "seqlock_t"}

KINDS = ("UNKN", "INT", "PTR", "ARRAY", "STRUCT", "UNION", "ENUM", "FWD", "TYPEDEF",
         "VOLATILE", "CONST", "RESTRICT", "FUNC", "FUNC_PROTO", "VAR", "DATASEC", "FLOAT",
         "DECL_TAG", "TYPE_TAG", "ENUM64")
# bytes that follow a type's 12-byte header: fixed, and per vlen item
_EXTRA = {"INT": (4, 0), "ARRAY": (12, 0), "STRUCT": (0, 12), "UNION": (0, 12),
          "ENUM": (0, 8), "FUNC_PROTO": (0, 8), "VAR": (4, 0), "DATASEC": (0, 12),
          "DECL_TAG": (4, 0), "ENUM64": (0, 12)}
_MAGIC = 0xEB9F


class BtfError(RuntimeError):
    pass


class RawBtf:
    """One BTF blob (vmlinux's, or a module's split BTF on top of it): its types by id,
    decoded on demand (get(id) -> dict or None)."""

    def __init__(self, data, base=None, path="?"):
        if len(data) < 24:
            raise BtfError(f"{path}: not BTF (too short)")
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data)
        if magic != _MAGIC:
            raise BtfError(f"{path}: not BTF, or not little-endian (magic {magic:#x})")
        self.base, self.path = base, path
        self.data = data
        self.types = memoryview(data)[hdr_len + type_off:hdr_len + type_off + type_len]
        self.strs = bytes(memoryview(data)[hdr_len + str_off:hdr_len + str_off + str_len])
        self.first = (base.first + len(base.offsets)) if base else 1
        self.str_base = (base.str_base + len(base.strs)) if base else 0
        self.offsets = array("I")
        self.kind_of = bytearray()
        pos, n = 0, len(self.types)
        while pos < n:
            info = struct.unpack_from("<I", self.types, pos + 4)[0]
            kind = (info >> 24) & 0x1F
            if kind >= len(KINDS):
                raise BtfError(f"{path}: unknown BTF kind {kind}")
            fixed, per = _EXTRA.get(KINDS[kind], (0, 0))
            self.offsets.append(pos)
            self.kind_of.append(kind)
            pos += 12 + fixed + per * (info & 0xFFFF)

    def name(self, off):
        if off >= self.str_base or not self.base:
            s = self.strs
            off -= self.str_base
        else:
            return self.base.name(off)
        end = s.index(b"\0", off)
        return s[off:end].decode() or "(anon)"

    def ids(self, kind):
        """The ids of this blob's own types of one kind."""
        k = KINDS.index(kind)
        return [self.first + i for i, x in enumerate(self.kind_of) if x == k]

    def size_of(self, type_id):
        """The size field of a type (or what it points at: its kind tells)."""
        return struct.unpack_from("<I", self.types, self.offsets[type_id - self.first] + 8)[0]

    def name_of(self, type_id):
        """A type's name without decoding the rest of it."""
        pos = self.offsets[type_id - self.first]
        return self.name(struct.unpack_from("<I", self.types, pos)[0])

    def get(self, type_id, default=None):
        """The type `type_id` as bpftool's JSON has it (a unit's `get`, as a dict's)."""
        if type_id < self.first:
            return self.base.get(type_id, default) if self.base else default
        if type_id - self.first >= len(self.offsets):
            return default
        return self._decode(type_id)

    @functools.lru_cache(maxsize=8192)
    def _decode(self, type_id):
        pos = self.offsets[type_id - self.first]
        name_off, info, size_or_type = struct.unpack_from("<III", self.types, pos)
        kind, vlen, kflag = KINDS[(info >> 24) & 0x1F], info & 0xFFFF, info >> 31
        t = {"id": type_id, "kind": kind, "name": self.name(name_off)}
        p = pos + 12
        u = functools.partial(struct.unpack_from, buffer=self.types)
        if kind in ("INT", "ENUM", "ENUM64", "STRUCT", "UNION", "DATASEC", "FLOAT"):
            t["size"] = size_or_type
        elif kind not in ("FWD", "UNKN"):
            t["type_id"] = size_or_type
        if kind == "ARRAY":
            t["type_id"], t["index_type_id"], t["nr_elems"] = u("<III", offset=p)
        elif kind in ("STRUCT", "UNION"):
            t["vlen"], t["members"] = vlen, []
            for i in range(vlen):
                n, ty, off = u("<III", offset=p + 12 * i)
                m = {"name": self.name(n), "type_id": ty,
                     "bits_offset": off & 0xFFFFFF if kflag else off}
                if kflag and off >> 24:
                    m["bitfield_size"] = off >> 24
                t["members"].append(m)
        elif kind == "ENUM":
            fmt = "<Ii" if kflag else "<II"
            t["encoding"] = "SIGNED" if kflag else "UNSIGNED"
            t["vlen"], t["values"] = vlen, [
                {"name": self.name(n), "val": v}
                for n, v in (u(fmt, offset=p + 8 * i) for i in range(vlen))]
        elif kind == "ENUM64":
            t["vlen"], t["values"] = vlen, []
            for i in range(vlen):
                n, lo, hi = u("<III", offset=p + 12 * i)
                v = (hi << 32) | lo
                t["values"].append({"name": self.name(n),
                                    "val": v - (1 << 64) if kflag and v >> 63 else v})
        elif kind == "FUNC_PROTO":
            t["ret_type_id"] = t.pop("type_id")
            t["vlen"], t["params"] = vlen, [
                {"name": self.name(n), "type_id": ty}
                for n, ty in (u("<II", offset=p + 8 * i) for i in range(vlen))]
        elif kind == "DATASEC":
            t["vlen"], t["vars"] = vlen, [
                {"type_id": ty, "offset": o, "size": sz}
                for ty, o, sz in (u("<III", offset=p + 12 * i) for i in range(vlen))]
        elif kind == "VAR":
            t["linkage"] = u("<I", offset=p)[0]
        elif kind == "FUNC":
            t["linkage"] = vlen
        return t


def read(path, base=None):
    """A RawBtf of the file (vmlinux's, or a module's on top of `base`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BtfError(f"cannot read {path}: {e.strerror} (a kernel with "
                       "CONFIG_DEBUG_INFO_BTF is needed)") from None
    try:
        return RawBtf(data, base, path)
    except (struct.error, IndexError, ValueError) as e:
        raise BtfError(f"{path}: damaged BTF ({e})") from None


class _Index:
    """name -> what Btf keeps of the named types of some kinds (the first unit's first
    one wins): structs (unit, type) with a size, funcs (unit, their FUNC_PROTO), enums
    {value: enumerator}. Names are indexed at once, types decoded when asked for."""

    def __init__(self, units, kinds, sized=False):
        self.kinds = kinds
        self.ids = {}                                   # name -> (unit, id)
        for unit in units:
            if isinstance(unit, dict):
                found = [(t["id"], t.get("name")) for t in unit.values() if t["kind"] in kinds
                         and (not sized or t.get("size"))]
            else:
                raw = unit
                found = [(i, raw.name_of(i)) for k in kinds for i in raw.ids(k)
                         if not sized or raw.size_of(i)]
            for i, name in found:
                if name and name != "(anon)":
                    self.ids.setdefault(name, (unit, i))

    def _value(self, unit, type_id):
        t = unit.get(type_id)
        if self.kinds == ("FUNC",):
            return unit, unit.get(t["type_id"])
        if self.kinds == ("ENUM", "ENUM64"):
            return {v["val"]: v["name"] for v in t.get("values", [])}
        return unit, t

    def __getitem__(self, name):
        return self._value(*self.ids[name])

    def get(self, name, default=None):
        return self[name] if name in self.ids else default

    def __contains__(self, name):
        return name in self.ids

    def __len__(self):
        return len(self.ids)

    def items(self):
        return ((n, self._value(*v)) for n, v in self.ids.items())


class Btf:
    """Types of vmlinux plus the named modules' BTF (split BTF on top of vmlinux)."""

    def __init__(self, vmlinux=os.path.join(BTF_DIR, "vmlinux"), modules=None, types=None):
        # Each module's split BTF numbers its types after vmlinux's, independently of
        # the other modules: one id space per module, each on top of vmlinux.
        if types is not None:           # (tests: made-up types, bpftool's JSON shape)
            base = {t["id"]: t for t in types}
            units = [base]
            self.by_id = base
        else:
            raw = read(vmlinux)
            units = [raw]
            for m in modules if modules is not None else self.kvm_modules():
                p = os.path.join(BTF_DIR, m)
                if os.path.exists(p):
                    units.append(read(p, base=raw))
            self.by_id = units[0]
        self.structs = _Index(units, ("STRUCT", "UNION"), sized=True)   # name -> (unit, type)
        self.units = units

    # (indexed at first use: the contention probe's offsets, read before it attaches,
    # need the structs only)
    @functools.cached_property
    def funcs(self):
        """name -> (unit, FUNC_PROTO)"""
        return _Index(self.units, ("FUNC",))

    @functools.cached_property
    def enums(self):
        """name -> {value: enumerator}"""
        return _Index(self.units, ("ENUM", "ENUM64"))

    @staticmethod
    def kvm_modules():
        if not os.path.isdir(BTF_DIR):
            return []
        return sorted(m for m in os.listdir(BTF_DIR) if m.startswith("kvm"))

    def resolve(self, type_id, unit):
        """The type `type_id` is in `unit`, through typedefs and qualifiers."""
        t = unit.get(type_id)
        while t and t["kind"] in _QUALIFIERS:
            t = unit.get(t["type_id"])
        return t

    def _member(self, t, name, unit):
        """(byte offset, member type) of `name` in t, looking into anonymous members."""
        for m in t.get("members", []):
            mt = self.resolve(m["type_id"], unit)
            if m["name"] == name:
                return m["bits_offset"] // 8, mt
            if m["name"] in ("(anon)", "") and mt and mt["kind"] in ("STRUCT", "UNION"):
                found = self._member(mt, name, unit)
                if found:
                    return m["bits_offset"] // 8 + found[0], found[1]
        return None

    def func_params(self, name):
        """Parameter names of a kernel function, or None if BTF does not describe it."""
        unit, proto = self.funcs.get(name, (None, None))
        if not proto or proto.get("kind") != "FUNC_PROTO":
            return None
        return [p.get("name", "") for p in proto.get("params", [])]

    def has_struct(self, struct):
        return struct in self.structs

    def offset(self, struct, path):
        """Byte offset of a dotted field path ("arch.pv_time") in struct, or None."""
        unit, t = self.structs.get(struct, (None, None))
        off = 0
        for name in path.split("."):
            if t is None or t["kind"] not in ("STRUCT", "UNION"):
                return None
            found = self._member(t, name, unit)
            if not found:
                return None
            off += found[0]
            t = found[1]
        return off

    def size(self, struct):
        _, t = self.structs.get(struct, (None, None))
        return t["size"] if t else None

    def field_path(self, struct, offset):
        """The dotted path of the innermost named field holding byte `offset`."""
        unit, t = self.structs.get(struct, (None, None))
        path = []
        while t and t["kind"] in ("STRUCT", "UNION"):
            best = None
            for m in t.get("members", []):
                mt = self.resolve(m["type_id"], unit)
                start = m["bits_offset"] // 8
                size = self._sizeof(mt, unit)
                if size and start <= offset < start + size:
                    best = (m, mt, start)
                    break
            if not best:
                break
            m, mt, start = best
            if m["name"] not in ("(anon)", ""):
                path.append(m["name"])
            offset -= start
            t = mt
        return ".".join(path) or None

    def _type_names(self, type_id, unit):
        """(names along the typedef chain, resolved type) of a member's type."""
        names, t = [], unit.get(type_id)
        while t and t["kind"] in _QUALIFIERS:
            if t["kind"] == "TYPEDEF":
                names.append(t["name"])
            t = unit.get(t["type_id"])
        if t and t.get("name"):
            names.append(t["name"])
        return names, t

    def lock_path(self, struct, offset):
        """The dotted path of the lock that starts at byte `offset` of struct
        ("mmu_lock", "vcpu_array.xa_lock", "slots_lock.wait_lock": a mutex's own
        spinlock), or None when no lock starts there."""
        return self.lock_offsets(struct).get(offset)

    def lock_offsets(self, struct, types=LOCK_TYPES):
        """{byte offset: lock path} of every lock inside struct: it descends through
        structs; a lock is named where it starts (the outermost lock at an offset:
        "mmu_lock", not its raw_lock), and locks inside locks at other offsets too
        (a mutex's wait_lock)."""
        unit, t = self.structs.get(struct, (None, None))
        out = {}

        def walk(t, base, path):
            for m in t.get("members", []):
                names, mt = self._type_names(m["type_id"], unit)
                start = base + m["bits_offset"] // 8
                sub = path + ([m["name"]] if m["name"] not in ("(anon)", "") else [])
                if types.intersection(names):
                    out.setdefault(start, ".".join(sub))
                if mt and mt["kind"] in ("STRUCT", "UNION"):
                    walk(mt, start, sub)
        if t:
            walk(t, 0, [])
        return out

    def percpu_vars(self):
        """The per-CPU variables BTF describes ((offset in the per-CPU section, size,
        name, type id), by offset) and the section's size: ([], 0) without one."""
        if not hasattr(self, "_percpu"):
            unit = self.units[0]
            secs = [t for t in unit.values() if t["kind"] == "DATASEC"] \
                if isinstance(unit, dict) else [unit.get(i) for i in unit.ids("DATASEC")]
            sec = next((t for t in secs if t.get("name") == PERCPU), None)
            out = []
            for v in (sec or {}).get("vars", []):
                var = self.by_id.get(v["type_id"])
                if var and var["kind"] == "VAR":
                    out.append((v["offset"], v["size"], var["name"], var["type_id"]))
            self._percpu = (sorted(out), (sec or {}).get("size", 0))
        return self._percpu

    def lock_at(self, type_id, offset, unit=None):
        """The path (".lock", "[1].lock", ".mutex.wait_lock"; "" for the value itself)
        of the lock that starts `offset` bytes into a value of type `type_id`, through
        structs, unions, arrays and locks, or None."""
        unit = unit or self.by_id
        names, t = self._type_names(type_id, unit)
        path = ""
        if LOCK_TYPES.intersection(names) and offset == 0:
            return path                 # the value is a lock itself
        while t:
            if t["kind"] == "ARRAY":
                el = self.resolve(t["type_id"], unit)
                size = self._sizeof(el, unit)
                if not size or offset // size >= t["nr_elems"]:
                    return None
                path += f"[{offset // size}]"
                offset %= size
                names, t = self._type_names(t["type_id"], unit)
                if LOCK_TYPES.intersection(names) and offset == 0:
                    return path
                continue
            if t["kind"] not in ("STRUCT", "UNION"):
                return None
            for m in t.get("members", []):
                names, mt = self._type_names(m["type_id"], unit)
                start = m["bits_offset"] // 8
                if start <= offset < start + self._sizeof(mt, unit):
                    break
            else:
                return None
            if m["name"] not in ("(anon)", ""):
                path += f".{m['name']}"
            offset -= start
            if LOCK_TYPES.intersection(names) and offset == 0:
                return path
            t = mt                      # (inside a lock too: its wait_lock is one)
        return None

    def lock_paths(self, type_id, limit=1 << 16):
        """{offset: lock_at(type_id, offset)} of every offset where a lock starts in a
        value of type `type_id` (through structs, unions and arrays; at most `limit`
        offsets): lock_at's answers made once, so that their user need not keep the BTF."""
        unit, starts, memo = self.by_id, set(), {}

        def has_lock(tid):
            if tid not in memo:
                memo[tid] = False                       # (a cycle: through a pointer, none)
                names, t = self._type_names(tid, unit)
                kind = t and t["kind"]
                memo[tid] = bool(LOCK_TYPES.intersection(names)) or \
                    (kind == "ARRAY" and has_lock(t["type_id"])) or \
                    (kind in ("STRUCT", "UNION") and
                     any(has_lock(m["type_id"]) for m in t.get("members", [])))
            return memo[tid]

        def walk(tid, base):
            if len(starts) >= limit or not has_lock(tid):
                return
            names, t = self._type_names(tid, unit)
            if LOCK_TYPES.intersection(names):
                starts.add(base)
            if t and t["kind"] == "ARRAY":
                size = self._sizeof(self.resolve(t["type_id"], unit), unit)
                for i in range(t["nr_elems"] if size else 0):
                    walk(t["type_id"], base + i * size)
            elif t and t["kind"] in ("STRUCT", "UNION"):
                for m in t.get("members", []):
                    walk(m["type_id"], base + m["bits_offset"] // 8)
        walk(type_id, 0)
        return {o: p for o in sorted(starts) if (p := self.lock_at(type_id, o)) is not None}

    def _sizeof(self, t, unit):
        if t is None:
            return 0
        if "size" in t:
            return t["size"]
        if t["kind"] == "ARRAY":
            return self._sizeof(self.resolve(t["type_id"], unit), unit) * t["nr_elems"]
        if t["kind"] == "PTR":
            return 8
        return 0


PERCPU = ".data..percpu"
KFUNC = "(kfunc)"


def kfunc_id(btf, name):
    """A kernel function's BTF id in vmlinux (what a kfunc call names), or None."""
    unit, tid = btf.funcs.ids.get(name, (None, None))
    return tid if unit is btf.units[0] else None


TP_BTF = "(tp_btf)"


def tracepoint_btf_id(btf, tp):
    """The BTF id a tp_btf program on raw tracepoint `tp` attaches by (vmlinux's
    typedef btf_trace_TP), or None."""
    raw, want = btf.units[0], f"btf_trace_{tp}"
    if isinstance(raw, dict):
        return next((i for i, t in raw.items() if t["kind"] == "TYPEDEF" and
                     t.get("name") == want), None)
    return next((i for i in raw.ids("TYPEDEF") if raw.name_of(i) == want), None)


def define_name(name, spec):
    """A field's name in the C: KVMLP_ID_ for a BTF id (a kfunc's, a tp_btf's),
    KVMLP_OFF_ for an offset or a size."""
    return ("KVMLP_ID_" if spec[0] in (KFUNC, TP_BTF) else "KVMLP_OFF_") + name


def defines(btf, fields):
    """{DEFINE: offset} for {DEFINE: (struct, path or (paths, first found))}, the path
    "sizeof" giving the struct's size, the struct PERCPU a per-CPU variable's offset in
    that section, the struct KFUNC a kfunc's BTF id, TP_BTF a raw tracepoint's (what a
    tp_btf program names); -1 where this kernel lacks it."""
    out = {}
    percpu = {v[2]: v[0] for v in btf.percpu_vars()[0]} if btf and any(
        st == PERCPU for st, _ in fields.values()) else {}
    for name, (st, paths) in fields.items():
        offs = [(percpu.get(p) if st == PERCPU else kfunc_id(btf, p) if st == KFUNC
                 else tracepoint_btf_id(btf, p) if st == TP_BTF
                 else btf.size(st) if p == "sizeof" else btf.offset(st, p)) if btf
                else None for p in ((paths,) if isinstance(paths, str) else paths)]
        out[name] = next((o for o in offs if o is not None), -1)
    return out


OFFSETS = os.path.join(host.RUN_DIR, "offsets.json")


def kernel_defines(fields, load):
    """defines() for the running kernel, kept per boot in OFFSETS (its BTF does not
    change while it runs): load() (its Btf, or None) is called only where this boot's
    are not kept, so that a probe compiles without the BTF's read (0.09 s) and the
    read comes after the attach."""
    boot = host.boot_id()
    # the kernel and this boot, the fields asked for, and the code that reads them
    # (this module's source: a fix installed during the boot counts)
    with open(__file__, "rb") as f:
        code = f.read()
    key = boot and "|".join((platform.release(), boot, hashlib.sha256(
        json.dumps(fields, sort_keys=True).encode() + code).hexdigest()[:16]))
    got = host.kept(OFFSETS).get(key) if key else None
    if isinstance(got, dict) and set(got) == set(fields) and \
            all(isinstance(v, int) for v in got.values()):
        return got
    kbtf = load()
    out = defines(kbtf, fields)
    if key and kbtf is not None:
        host.keep(OFFSETS, key, out)
    return out
