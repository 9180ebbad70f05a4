"""Who held the contended sleeping locks (`record --lock-owner`): per lock and owner
thread, the waits that began while it held the lock, their time, and its share of the
lock's wait time. A mutex's owner, or a write-held rwsem's, as each wait began (the
lock's owner word: bpf/contention.bpf.c owner_of); a reader-held rwsem names none."""
import re


from kvmlockprof.analysis import locks
from kvmlockprof.lazy import pd

COLUMNS = ["lock", "owner", "vm", "waits", "wait_ns", "share"]
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
