"""Struct layouts of the running kernel, from its BTF (via bpftool's JSON dump).

BPF programs here never take an offset from headers (the fallback headers can be
years older than the kernel): every field they read reaches the C as a define
computed here. KVM may be a module, so module BTF under /sys/kernel/btf/ counts.
"""
import json
import os
import shutil
import subprocess

BTF_DIR = "/sys/kernel/btf"
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


# Types a contended lock can be (lock:contention_begin's lock argument points at one).
LOCK_TYPES = {"spinlock_t", "raw_spinlock_t", "rwlock_t", "spinlock", "raw_spinlock",
              "mutex", "rw_semaphore", "rt_mutex", "rt_mutex_base", "percpu_rw_semaphore",
              "qspinlock", "qrwlock", "arch_spinlock_t", "arch_rwlock_t", "seqlock_t"}


class BtfError(RuntimeError):
    pass


def _dump(path, base=None):
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    cmd = [bpftool, "-j"] + (["-B", base] if base else []) + ["btf", "dump", "file", path]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise BtfError("bpftool is missing: apt-get install bpftool") from None
    except subprocess.CalledProcessError as e:
        raise BtfError(f"bpftool cannot read {path}: {e.stderr.strip()}") from None
    return json.loads(out)["types"]


class Btf:
    """Types of vmlinux plus the named modules' BTF (split BTF on top of vmlinux)."""

    def __init__(self, vmlinux=os.path.join(BTF_DIR, "vmlinux"), modules=None, types=None):
        # Each module's split BTF numbers its types after vmlinux's, independently of
        # the other modules: one id space per module, each on top of vmlinux.
        base = {t["id"]: t for t in (types if types is not None else _dump(vmlinux))}
        units = [base]
        if types is None:
            for m in modules if modules is not None else self.kvm_modules():
                p = os.path.join(BTF_DIR, m)
                if os.path.exists(p):
                    own = {t["id"]: t for t in _dump(p, base=vmlinux) if t["id"] not in base}
                    units.append({**base, **own})
        self.structs = {}                  # name -> (id space, type)
        self.funcs = {}                    # name -> (id space, FUNC_PROTO)
        self.enums = {}                    # name -> {value: enumerator}
        for unit in units:
            for t in unit.values():
                if t["kind"] in ("STRUCT", "UNION") and t.get("name") and t.get("size"):
                    self.structs.setdefault(t["name"], (unit, t))
                elif t["kind"] == "FUNC":
                    self.funcs.setdefault(t["name"], (unit, unit.get(t["type_id"])))
                elif t["kind"] in ("ENUM", "ENUM64") and t.get("name"):
                    self.enums.setdefault(t["name"], {v["val"]: v["name"]
                                                      for v in t.get("values", [])})
        self.by_id = base

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
            sec = next((t for t in self.by_id.values() if t["kind"] == "DATASEC"
                        and t.get("name") == ".data..percpu"), None)
            out = []
            for v in (sec or {}).get("vars", []):
                var = self.by_id.get(v["type_id"])
                if var and var["kind"] == "VAR":
                    out.append((v["offset"], v["size"], var["name"], var["type_id"]))
            self._percpu = (sorted(out), (sec or {}).get("size", 0))
        return self._percpu

    def lock_at(self, type_id, offset, unit=None):
        """The path (".lock", "[1].lock") of the lock that starts `offset` bytes into a
        value of type `type_id`, through structs, unions and arrays, or None."""
        unit = unit or self.by_id
        t, path = self.resolve(type_id, unit), ""
        while t:
            if t["kind"] == "ARRAY":
                el = self.resolve(t["type_id"], unit)
                size = self._sizeof(el, unit)
                if not size or offset // size >= t["nr_elems"]:
                    return None
                path += f"[{offset // size}]"
                offset %= size
                names, t = self._type_names(t["type_id"], unit)
                if LOCK_TYPES.intersection(names):
                    return path if offset == 0 else None
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
            if LOCK_TYPES.intersection(names):
                return path if offset == 0 else None
            t = mt
        return None

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


def defines(btf, fields):
    """{DEFINE: offset} for {DEFINE: (struct, path or (paths, first found))}, the path
    "sizeof" giving the struct's size; -1 where this kernel lacks it."""
    out = {}
    for name, (struct, paths) in fields.items():
        offs = [(btf.size(struct) if p == "sizeof" else btf.offset(struct, p)) if btf
                else None for p in ((paths,) if isinstance(paths, str) else paths)]
        out[name] = next((o for o in offs if o is not None), -1)
    return out
