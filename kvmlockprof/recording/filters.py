"""perf lock contention's filters for record and top (-L, -Y, -S, --tid, -G): which
the kernel applies (threads, lock addresses and symbols, types, cgroups: the waits
they drop never reach a map or the ring buffer), and which only the recording's
reader can (a glob on a KVM-aware name, known once a lock is seen; a frame of a
stack, walked only for some waits). The second kind is kept in the manifest and
applied wherever the recording is read (analysis.locks.annotate)."""
import os
import re

from kvmlockprof import cdefs
from kvmlockprof.locktypes import LCB_F_MUTEX, type_matches, type_name

MAX_CGROUPS = 8                 # -G: one under-cgroup check each at every begin and end
TYPE_SLOTS, TYPE_END, TYPE_BEGIN = (cdefs.define("contention.h", d) for d in (
    "KVMLP_TYPE_SLOTS", "KVMLP_TYPE_END", "KVMLP_TYPE_BEGIN"))
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def cgroup2_root(mounts="/proc/self/mounts"):
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or .../unified beside v1), or None."""
    with open(mounts) as f:
        for line in f:
            dev, path, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return path
    return None


class FilterError(ValueError):
    """A filter that cannot be set up: the message says what to give instead."""


def type_bits(types):
    """-Y as bpf/contention.bpf.c's type_filter: per LCB_F_* flags value, END if a
    wait that ends with these flags is kept (the same rule as the reader's,
    locktypes.type_matches), BEGIN if a begin with them may start one (every
    mutex begin, when any mutex type is kept: its type is known only at its end)."""
    end = [type_matches(types, type_name(f)) for f in range(TYPE_SLOTS)]
    any_mutex = any(e for f, e in enumerate(end) if f & LCB_F_MUTEX)
    return [(TYPE_END if e else 0) | (TYPE_BEGIN if e or (f & LCB_F_MUTEX and any_mutex) else 0)
            for f, e in enumerate(end)]


def _address(pattern):
    try:
        return int(pattern, 16) if pattern.lower().startswith("0x") else None
    except ValueError:
        return None


def lock_addresses(patterns, kallsyms):
    """-L's addresses, when every pattern is an address or a data symbol; None when
    one is a name glob (`kvm->mmu_lock`, `kvm(*)->*`: filtered as the recording is
    read). A bare symbol that kallsyms does not have is an error."""
    out = []
    for p in patterns:
        a = _address(p)
        if a is None and not _SYMBOL.match(p):
            return None
        if a is None:
            a = kallsyms().data_address(p)
            if a is None:
                raise FilterError(
                    f"-L {p}: no data symbol {p!r} in /proc/kallsyms (kernels without "
                    f"CONFIG_KALLSYMS_ALL have none): give its address (0x...) or a "
                    f"KVM-aware name such as 'kvm->mmu_lock'")
        out.append(a)
    return out


def cgroup_paths(names):
    """-G: cgroup v2 directories, as perf takes them (relative to the cgroup2 mount)."""
    if len(names) > MAX_CGROUPS:
        raise FilterError(f"-G takes at most {MAX_CGROUPS} cgroups")
    out, root = [], cgroup2_root() if names else None
    if names and root is None:
        raise FilterError("-G needs cgroup v2, and none is mounted: mount -t cgroup2 none "
                          "/sys/fs/cgroup/unified")
    for n in names:
        path = n if os.path.isabs(n) else os.path.join(root, n.lstrip("/"))
        if not os.path.isfile(os.path.join(path, "cgroup.procs")):
            raise FilterError(f"-G {n}: no cgroup v2 directory {path} (see `systemd-cgls`; "
                              f"libvirt's VMs are machine.slice/machine-qemu...scope)")
        out.append(os.path.realpath(path))
    return out


def split(locks=(), types=(), callstacks=(), tids=(), cgroups=(), kallsyms=None):
    """(kernel, read): the filters the contention probe sets in the kernel
    ({tids, addrs, type_bits, cgroups}, None for those not given) and those
    left to the reader ({locks, types, callstacks}, as analysis.locks.apply_filters
    takes them). kallsyms: a callable giving a kernel.ksyms.Kallsyms (read only
    when a symbol is given)."""
    addrs = lock_addresses(locks, kallsyms) if locks else None
    kernel = {"tids": sorted(set(tids)) or None, "addrs": addrs,
              "type_bits": type_bits(types) if types else None,
              "cgroups": cgroup_paths(cgroups) or None}
    read = {"locks": tuple(locks) if locks and addrs is None else (),
            "types": (), "callstacks": tuple(callstacks)}
    return kernel, read


def manifest_entry(kernel, read, locks=(), types=(), tids=(), cgroups=()):
    """What the recording says of its filters: each as given, and where it ran."""
    out = {}
    if tids:
        out["tid"] = {"values": list(tids), "where": "kernel"}
    if locks:
        out["lock"] = {"values": list(locks),
                       "where": "read" if read["locks"] else "kernel",
                       **({"addresses": [f"{a:#x}" for a in kernel["addrs"]]}
                          if kernel["addrs"] is not None else {})}
    if types:
        out["type"] = {"values": list(types), "where": "kernel"}
    if cgroups:
        out["cgroup"] = {"values": list(cgroups), "paths": kernel["cgroups"],
                         "where": "kernel"}
    if read["callstacks"]:
        out["callstack"] = {"values": list(read["callstacks"]), "where": "read"}
    return out


def read_filters(manifest):
    """The filters a reader applies ({locks, types, callstacks}), from the manifest."""
    f = manifest.get("filters") or {}

    def values(name):
        e = f.get(name)
        ok = isinstance(e, dict) and e.get("where") == "read" and \
            isinstance(e.get("values"), list)
        return tuple(str(v) for v in e["values"]) if ok else ()
    return {"locks": values("lock"), "types": (), "callstacks": values("callstack")}
