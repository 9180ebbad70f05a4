"""Per-vCPU impact (`record --vcpu-exits`): how much of each vCPU's time in the host
went to waiting on each lock, and which exit reasons waited most.

A window is one exit's handling (kvm:kvm_exit to kvm:kvm_entry, where the kernel
fires them) or one KVM_RUN (the ioctl's entry to kvm:kvm_userspace_exit: guest time
included, and the reason is why the run returned to user space). The in-kernel
tables count every window and every wait inside one (bpf/contention.bpf.c):
nothing here is sampled. Views use exit windows where the recording has any, else
KVM_RUN windows, and say which in their `window` column."""
import errno


from kvmlockprof import cdefs
from kvmlockprof.analysis import locks
from kvmlockprof.lazy import pd

BASIS = cdefs.labels("contention.h", "kvmlp_basis", {
    "KVMLP_BASIS_EXIT": "exit handling", "KVMLP_BASIS_RUN": "KVM_RUN"})
REASON_ERRNO = cdefs.define("contention.h", "KVMLP_REASON_ERRNO")
VMX_FAILED_ENTRY = 1 << 31          # exit_reason's bit 31 on VMX: the entry failed


def _names(rec):
    return ((rec.manifest.get("probes") or {}).get("contention") or {}).get("vcpu_exits") \
        or {}


def recorded(rec):
    """Whether the recording was made with --vcpu-exits."""
    return bool(_names(rec))


def reason_name(names, basis, isa, reason):
    """The kernel's name of a window's reason (its tracepoints' print fmt, kept in
    the recording), else the number."""
    if basis == "KVM_RUN":
        if reason & REASON_ERRNO:
            err = reason & ~REASON_ERRNO
            return "restart (EINTR)" if err == errno.EINTR else f"error (errno {err})"
        return names.get("run", {}).get(str(reason), str(reason))
    table = names.get("exit", {}).get(str(isa), {})
    code = reason & 0xffff if isa == 1 else reason
    name = table.get(str(code)) or table.get(str(code - (1 << 32))) or f"{reason:#x}"
    return name + (" FAILED_VMENTRY" if isa == 1 and reason & VMX_FAILED_ENTRY else "")


def windows(rec):
    """Every (thread, window kind, reason) row: windows, their time, and the waits
    inside them, labelled: vm, vcpu (VM/vcpuN, else the thread), window, reason."""
    df = rec.table("vcpu_exits")
    cols = ["tgid", "vm", "tid", "vcpu", "window", "reason", "windows", "time_ns",
            "waits", "wait_ns"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    names = _names(rec)
    df = df.assign(window=df["basis"].map(BASIS))
    df["reason"] = [reason_name(names, b, i, r) for b, i, r in
                    zip(df["window"], df["isa"], df["reason"])]
    return _label(rec, df).rename(columns={"count": "windows"})[cols]


def _label(rec, df):
    """vm and vcpu columns for rows with tgid and tid (and comm if recorded)."""
    comms = df["comm"].astype(str) if "comm" in df else pd.Series("?", index=df.index)
    vcpu = locks.vcpu_labels(rec, {t: (p, c) for t, p, c in
                                    zip(df["tid"], df["tgid"], comms)})
    vm = locks.vm_labels(rec)
    return df.assign(vm=df["tgid"].map(vm).fillna(df["tgid"].astype(str)),
                     vcpu=[vcpu.get(t, f"{c} ({t})") for t, c in zip(df["tid"], comms)])


def note(rec):
    """One line on what the windows are, for a recording made with --vcpu-exits."""
    if not recorded(rec):
        return None
    if basis(rec) == "exit handling":
        return ("per-vCPU impact (--vcpu-exits): windows are exits' handling, "
                "kvm:kvm_exit to kvm:kvm_entry")
    why = _names(rec).get("why_no_exits") or "the kernel has them, but they never fired " \
        "(e.g. a PVM host's own exit path)"
    return ("per-vCPU impact (--vcpu-exits): no kvm:kvm_exit/kvm_entry seen (" + why +
            "): windows are whole KVM_RUN calls, guest time included; the reason is "
            "why each returned to user space")


def basis(rec):
    """The window kind the views use: exit handling where any exit was seen."""
    df = rec.table("vcpu_exits")
    exit_code = next(k for k, v in BASIS.items() if v == "exit handling")
    return "exit handling" if not df.empty and (df["basis"] == exit_code).any() \
        else "KVM_RUN"


def vcpu_impact(rec):
    """Per vCPU thread: its windows, their time, the waits inside and the share of
    that time spent waiting (wait_share)."""
    w = windows(rec)
    cols = ["vm", "vcpu", "tid", "window", "windows", "time_ns", "waits", "wait_ns",
            "wait_share"]
    w = w[w["window"] == basis(rec)]
    if w.empty:
        return pd.DataFrame(columns=cols)
    out = w.groupby(["vm", "vcpu", "tid", "window"], as_index=False)[
        ["windows", "time_ns", "waits", "wait_ns"]].sum()
    out["wait_share"] = out["wait_ns"] / out["time_ns"].where(out["time_ns"] > 0)
    return out[cols].sort_values("wait_ns", ascending=False, ignore_index=True)


def vcpu_lock_share(rec):
    """Per vCPU thread and lock: waits inside its windows, their time, and its share
    of the vCPU's window time (wait_share): which lock each vCPU's host time waits on."""
    cols = ["vm", "vcpu", "lock", "type", "window", "waits", "wait_ns", "wait_share"]
    b = basis(rec)
    lw = rec.table("vcpu_exit_waits")
    if lw.empty:
        return pd.DataFrame(columns=cols)
    lw = lw[lw["basis"].map(BASIS) == b]
    time = vcpu_impact(rec).set_index("tid")["time_ns"]
    names = locks.lock_names(rec)
    lw = lw.assign(lock=[names.get(f"{a:#x}", f"{a:#x}") for a in lw["lock_addr"]],
                   type=locks.lock_type(lw["flags"]).to_numpy(), window=b)
    out = lw.groupby(["tgid", "tid", "lock", "type", "window"], as_index=False)[
        ["count", "wait_ns"]].sum().rename(columns={"count": "waits"})
    out["wait_share"] = out["wait_ns"] / out["tid"].map(time).where(lambda t: t > 0)
    ex = rec.table("vcpu_exits")
    if "comm" in ex:
        out["comm"] = out["tid"].map(dict(zip(ex["tid"], ex["comm"].astype(str))))
    return _label(rec, out)[cols].sort_values("wait_ns", ascending=False,
                                              ignore_index=True)


def exit_reasons(rec):
    """Per VM and reason: windows, their time, the waits inside, the mean wait per
    window and the share of the reason's time spent waiting; the heaviest first."""
    cols = ["vm", "window", "reason", "windows", "time_ns", "waits", "wait_ns",
            "wait_per_window_ns", "wait_share"]
    w = windows(rec)
    w = w[w["window"] == basis(rec)]
    if w.empty:
        return pd.DataFrame(columns=cols)
    out = w.groupby(["vm", "window", "reason"], as_index=False)[
        ["windows", "time_ns", "waits", "wait_ns"]].sum()
    out["wait_per_window_ns"] = out["wait_ns"] / out["windows"]
    out["wait_share"] = out["wait_ns"] / out["time_ns"].where(out["time_ns"] > 0)
    return out[cols].sort_values(["wait_ns", "windows"], ascending=False,
                                 ignore_index=True)
