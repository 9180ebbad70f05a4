"""Who held the contended sleeping locks (`record --lock-owner`): per lock and owner
thread, the waits that began while it held the lock, their time, and its share of the
lock's wait time. A mutex's owner, or a write-held rwsem's, as each wait began (the
lock's owner word: bpf/contention.bpf.c owner_of); a reader-held rwsem names none."""
import re


from kvmlockprof.analysis import locks
from kvmlockprof.lazy import pd

COLUMNS = ["lock", "owner", "vm", "waits", "wait_ns", "share"]
STACK_COLUMNS = ["lock", "owner", "where", "samples", "share"]
# The scheduler's and the sleeping primitives' frames, above where an owner slept
_SLEEP = re.compile(r"^(__schedule|schedule\w*|__switch_to\w*|preempt_schedule\w*|"
                    r"io_schedule\w*|__wait_for_common|wait_for_completion\w*|"
                    r"do_wait_for_common|"
                    r"__mutex_lock\w*|mutex_lock\w*|rwsem_down_\w+|down_(read|write)\w*|"
                    r"__down\w*|msleep\w*|usleep\w*|do_nanosleep|hrtimer_nanosleep\w*|"
                    r"futex_\w*wait\w*|__futex_wait|do_futex|__x64_sys_\w*|x64_sys_call|"
                    r"do_syscall_64|entry_SYSCALL\w*)$")
WHERE_FRAMES = 4
BY_OWNER = ["owner", "vm", "waits", "wait_ns", "locks", "lock", "lock_share"]
# A thread name's instance part: kworker/u8:3's "/u8:3", worker-12's "-12" (a bare
# trailing number stays: qemu-system-x86)
_INSTANCE = re.compile(r"(?:/.*|[-_:. ]\d+)$")


def recorded(rec):
    """Whether the recording was made with --lock-owner."""
    return bool(((rec.manifest.get("probes") or {}).get("contention") or {}).get("lock_owner"))


def owner_class(comm, vcpu=False):
    """An owner's class, its label where threads come and go (the exporter): "vcpu" for
    a VM's vCPU thread, else its thread name without the instance part (kworker/u8:3
    -> kworker, worker-12 -> worker); the exporter's Labels bound the rest."""
    if vcpu:
        return "vcpu"
    c = _INSTANCE.sub("", str(comm)).strip()
    return c or "?"


def lock_owners(rec):
    """Per lock and owner thread (`VM/vcpuN`, else `comm (tid)`), the heaviest first:
    waits, wait_ns, and share, of all the lock's wait time (the aggregates')."""
    t = rec.table("lock_owners")
    if t.empty:
        return pd.DataFrame(columns=COLUMNS)
    names = locks.lock_names(rec)
    name = lambda a: names.get(f"{int(a):#x}", f"{int(a):#x}")   # noqa: E731
    aggs = rec.aggregates
    # the lock's wait time: every wait on an address of that name (owned or not)
    per_lock = aggs.assign(lock=aggs["lock_addr"].map(name)).groupby("lock")["total_ns"] \
        .sum() if not aggs.empty else pd.Series(dtype="float64")
    comms = {int(o): (int(p), str(c)) for o, p, c in
             zip(t["owner"], t["owner_tgid"], t["owner_comm"])}
    vcpu = locks.vcpu_labels(rec, comms)
    vm = locks.vm_labels(rec)
    out = pd.DataFrame({
        "lock": [name(a) for a in t["lock_addr"]],
        "owner": [vcpu.get(int(o), f"{comms[int(o)][1]} ({int(o)})") for o in t["owner"]],
        "vm": [vm.get(int(p), str(int(p)) if int(p) else "?") for p in t["owner_tgid"]],
        "waits": t["count"].astype("int64"), "wait_ns": t["total_ns"].astype("int64")})
    out = out.groupby(["lock", "owner", "vm"], as_index=False)[["waits", "wait_ns"]].sum()
    total = out["lock"].map(per_lock)
    out["share"] = out["wait_ns"] / total.where(total > 0)
    return out[COLUMNS].sort_values("wait_ns", ascending=False, ignore_index=True)


def heaviest(rec):
    """{lock name: (owner, its share of the lock's wait time)}: the owner behind most
    of each lock's wait time."""
    df = lock_owners(rec)
    if df.empty:
        return {}
    top = df.sort_values("wait_ns", ascending=False, kind="stable").drop_duplicates("lock")
    return {r.lock: (r.owner, r.share) for r in top.itertuples(index=False)}


def by_owner(rec, sort="total", owner_pids=None):
    """`report --by owner`: per owner thread, the waits it caused (on every lock), their
    time, how many locks, and the lock it was behind most with its share of that lock's
    wait time. owner_pids: only owners of these processes."""
    df = lock_owners(rec)
    if owner_pids:
        pid_of = _owner_pids(rec)
        df = df[df["owner"].map(pid_of).isin(owner_pids)]
    if df.empty:
        return pd.DataFrame(columns=BY_OWNER)
    g = df.groupby(["owner", "vm"], sort=False)
    out = g.agg(waits=("waits", "sum"), wait_ns=("wait_ns", "sum"), locks=("lock", "nunique"))
    top = df.sort_values("wait_ns", ascending=False, kind="stable") \
        .drop_duplicates(["owner", "vm"]).set_index(["owner", "vm"])
    out["lock"], out["lock_share"] = top["lock"], top["share"]
    key = {"total": "wait_ns", "contended": "waits"}.get(sort, "wait_ns")
    return out.reset_index().sort_values(key, ascending=False, kind="stable",
                                         ignore_index=True)[BY_OWNER]


def _owner_pids(rec):
    """{owner label: its process id} (lock_owners' labels)."""
    t = rec.table("lock_owners")
    comms = {int(o): (int(p), str(c)) for o, p, c in
             zip(t["owner"], t["owner_tgid"], t["owner_comm"])}
    vcpu = locks.vcpu_labels(rec, comms)
    return {vcpu.get(o, f"{c} ({o})"): p for o, (p, c) in comms.items()}


def slept_at(rec):
    """{(lock name, owner label): where it slept most} (owner_stacks)."""
    df = owner_stacks(rec)
    top = df.drop_duplicates(["lock", "owner"])     # (sorted by samples)
    return {(r.lock, r.owner): r.where for r in top.itertuples(index=False)}


def where(frames, n=WHERE_FRAMES):
    """Where an owner slept, from its stack (innermost first): the first n frames below
    the scheduler's and the sleeping primitives', outermost first (`kvm_set_memslot ->
    kvm_swap_active_memslots -> synchronize_srcu_expedited`)."""
    fns = [str(f).split("+")[0].split()[0] for f in frames if f]
    i = 0
    while i < len(fns) and _SLEEP.match(fns[i]):
        i += 1
    return " -> ".join(reversed((fns[i:] if i < len(fns) else fns)[:n]))


def owner_stacks(rec):
    """Where the owners slept (`record --lock-owner`, where the kernel lets a tracing
    program read another task's stack): per lock and owner thread, each place its
    kernel stack was found as a wait on the lock began (an owner running on a CPU has
    none: only sleeping owners are sampled), the samples and their share of that
    owner's on that lock."""
    t = rec.table("owner_stacks")
    if t.empty:
        return pd.DataFrame(columns=STACK_COLUMNS)
    names = locks.lock_names(rec)
    o = rec.table("lock_owners")
    comms = {int(x): (int(p), str(c)) for x, p, c in
             zip(o["owner"], o["owner_tgid"], o["owner_comm"])} if not o.empty else {}
    vcpu = locks.vcpu_labels(rec, comms)
    label = lambda x: vcpu.get(x, f"{comms.get(x, (0, '?'))[1]} ({x})")  # noqa: E731
    out = pd.DataFrame({
        "lock": [names.get(f"{int(a):#x}", f"{int(a):#x}") for a in t["lock_addr"]],
        "owner": [label(int(x)) for x in t["owner"]],
        "where": [where(f) for f in t["frames"]],
        "samples": t["count"].astype("int64")})
    out = out.groupby(["lock", "owner", "where"], as_index=False)["samples"].sum()
    out["share"] = out["samples"] / out.groupby(["lock", "owner"])["samples"].transform("sum")
    return out.sort_values(["samples"], ascending=False, ignore_index=True)[STACK_COLUMNS]
