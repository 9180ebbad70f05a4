"""Who held the contended sleeping locks (`record --lock-owner`): per lock and owner
thread, the waits that began while it held the lock, their time, and its share of the
lock's wait time. A mutex's owner, or a write-held rwsem's, as each wait began (the
lock's owner word: bpf/contention.bpf.c owner_of); a reader-held rwsem names none."""
import pandas as pd

from kvmlockprof.analysis import locks

COLUMNS = ["lock", "owner", "vm", "waits", "wait_ns", "share"]


def recorded(rec):
    """Whether the recording was made with --lock-owner."""
    return bool(((rec.manifest.get("probes") or {}).get("contention") or {}).get("lock_owner"))


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
