"""Lock types and the rules -L and -Y match locks by: the tracepoint's LCB_F_* flags,
the names `perf lock contention` gives them, a KVM lock's class. Below both the
kernel's filters (recording.filters) and the reader's (analysis.locks), so that the
two apply one rule."""
import fnmatch
import re

from kvmlockprof import cdefs

# The tracepoint's flags (include/trace/events/lock.h), as bpf/contention.h states them
LCB_F_SPIN, LCB_F_READ, LCB_F_WRITE, LCB_F_RT, LCB_F_PERCPU, LCB_F_MUTEX = (
    cdefs.define("contention.h", f"KVMLP_LCB_F_{f}")
    for f in ("SPIN", "READ", "WRITE", "RT", "PERCPU", "MUTEX"))
# The names `perf lock contention` prints.
LOCK_TYPES = {
    LCB_F_SPIN: "spinlock", LCB_F_SPIN | LCB_F_READ: "rwlock:R",
    LCB_F_SPIN | LCB_F_WRITE: "rwlock:W", LCB_F_READ: "rwsem:R", LCB_F_WRITE: "rwsem:W",
    LCB_F_RT: "rt-mutex", LCB_F_RT | LCB_F_READ: "rwlock-rt:R",
    LCB_F_RT | LCB_F_WRITE: "rwlock-rt:W", LCB_F_PERCPU | LCB_F_READ: "pcpu-sem:R",
    LCB_F_PERCPU | LCB_F_WRITE: "pcpu-sem:W", LCB_F_MUTEX: "mutex",
    LCB_F_MUTEX | LCB_F_SPIN: "mutex-spin",
}


def type_name(flags):
    """perf's lock type name of one LCB_F_* flags value."""
    return LOCK_TYPES.get(int(flags), f"flags={int(flags):#x}")


def type_matches(patterns, typ):
    """perf's -Y: a type (`rwlock:R`) or its family (`rwlock`: both sides; `mutex`:
    mutex and mutex-spin)."""
    return any(typ == p or typ.split(":")[0] == p or typ.startswith(p + "-")
               for p in patterns)


_PID = re.compile(r"^kvm\(\d+\)->(vcpu\d+->)?")


# the other names with an instance in them (recording.locknames.KernelNamer)
_INSTANCE = re.compile(r"^(rq|mm|zone|futex_hash_bucket)\([^)]*\)->")
_AT = re.compile(r"@[0-9a-f]+$")
_PERCPU = re.compile(r"^(\w+)\(cpu \d+\)(?!->)")


def lock_class(name):
    """A lock's class, its place in any VM, CPU or process: `kvm(1234)->vcpu0->mutex`
    -> `vcpu->mutex`; `kvm(1234)->slots_lock` -> `kvm->slots_lock`; `rq(cpu 3)->__lock`
    -> `rq->__lock`; `mm(1234)->mmap_lock` -> `mm->mmap_lock`;
    `zone(Node 0, Normal)->lock`, `zone->lock@ffff888...` -> `zone->lock`;
    `timer_bases(cpu 1)[0].lock` -> `timer_bases[0].lock`."""
    name = _PID.sub(lambda m: "vcpu->" if m.group(1) else "kvm->", name)
    name = _PERCPU.sub(r"\1", name)
    return _AT.sub("", _INSTANCE.sub(lambda m: f"{m.group(1)}->", name))


def lock_matches(patterns, addr, name):
    """perf lock contention's -L: an address (0x...), or a glob on the lock's name,
    its name without the pid, or its class (`kvm->mmu_lock`, `vcpu->mutex`)."""
    forms = {str(name), re.sub(r"\(\d+\)", "", str(name)), lock_class(str(name)),
             f"{int(addr):#x}"}
    for p in patterns:
        try:
            if int(p, 16) == int(addr):
                return True
        except ValueError:          # not an address: a glob (`0xffff88*` too)
            pass
        if any(fnmatch.fnmatchcase(f, p) for f in forms):
            return True
    return False
