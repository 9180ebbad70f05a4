"""Lab: the lockorder probe live on the 6.12 lab kernel (kprobes, KVM_XEN), with the
Xen workload with and without an explicit vcpu_info per vCPU.

The kernel's own count is the oracle for the acquisition counts: every vCPU ioctl
takes vcpu->mutex once (kvm_vcpu_ioctl: mutex_lock_killable), so the acquisitions
of class vcpu->mutex equal an ftrace instance's count of kvm_vcpu_ioctl. The edges
are checked against locking.rst (none reversed or forbidden) and against what
6.12's xen.c does (kvm_xen_set_evtchn_fast drops the shared_info cache's lock
before it takes the vcpu_info cache's: no edge between them either way)."""
import pytest

import kvmlockprof
from kvmlockprof import lab
from kvmlockprof.probes import lockorder as lo
from test_lab import LAB_TIMEOUT, ftrace_count, ftrace_counting, lab_problem, lab_run

pytestmark = pytest.mark.lab

XEN = "kvmlockprof workload --vcpus 1 --duration 4 --xen"
# kvm_xen_set_evtchn() calls the fast path once outside kvm->srcu, then (on
# -EWOULDBLOCK) again inside it; kvm_gpc_check() runs under the caller's srcu
SRCU_AT = ("kvm_vcpu_update_apicv", "kvm_xen_set_evtchn_fast", "kvm_gpc_check")


@pytest.fixture(scope="module")
def lockorder_run(tmp_path_factory):
    problem = lab_problem()
    if problem:
        pytest.skip(f"no lab: {problem}")
    kernel = lab.find_kernel(option="CONFIG_KVM_XEN")
    if not kernel:
        pytest.skip("no Xen-capable lab kernel (make lab installs bookworm-backports')")
    d = tmp_path_factory.mktemp("lockorder")
    info = (f"kvmlockprof record -q -o info.parquet --probes vms,lockorder --srcu-at "
            f"{','.join(SRCU_AT)} -- {XEN}")
    script = (ftrace_counting("kvm_vcpu_ioctl", "ftrace-vcpu-ioctl.txt", info) +
              f"; kvmlockprof record -q -o noinfo.parquet --probes vms,lockorder -- "
              f"{XEN} --no-xen-vcpu-info && kvmlockprof record -q -o idle.parquet "
              f"--probes vms,lockorder -- sleep 5 && kvmlockprof report --order info.parquet "
              f"> order.txt && kvmlockprof compare noinfo.parquet info.parquet > cmp.txt; "
              f"bpftool prog show > progs.txt; cat /sys/kernel/tracing/kprobe_events "
              f"> kprobes.txt")
    # ftrace_counting ends with `exit $rc`: the second record goes in the same shell
    script = script.replace("; exit $rc", "; [ $rc = 0 ] || exit $rc", 1)
    # one emulator thread: lockorder's raw tracepoints (softirq, sys_exit) attach by
    # patching static keys, and under several a CPU ran into the int3 of one being
    # patched (tests/test_lab_lockdep.py)
    return lab_run(d, script, kernel, LAB_TIMEOUT, tcg_thread="single")


def test_acquisitions_match_the_kernels_count(lockorder_run):
    rec = kvmlockprof.load(lockorder_run / "info.parquet")
    st = rec.manifest["probes"]["lockorder"]
    print("lockorder:", st.get("status"), st.get("method"), st.get("off"))
    assert st["status"] == "attached", st
    cx = lo.contexts(rec)
    mutex = int(cx[cx["lock_class"] == "vcpu->mutex"]["count"].sum())
    ioctls = ftrace_count(lockorder_run / "ftrace-vcpu-ioctl.txt")
    c = rec.manifest["probe_counters"]["lockorder"]
    cost = rec.manifest.get("probe_cost", {}).get("lockorder", {})
    print(f"vcpu->mutex taken {mutex} times; ftrace kvm_vcpu_ioctl {ioctls}; counters {c}; "
          f"cost {cost}")
    assert ioctls > 1000 and mutex == ioctls, (mutex, ioctls)
    assert c["lost_agg_full"] == c["lost_held_full"] == c["depth_overflow"] == 0


def test_edges_hold_lockings_documented_orders(lockorder_run):
    rec = kvmlockprof.load(lockorder_run / "info.parquet")
    e = lo.edges(rec)
    print((lockorder_run / "order.txt").read_text())
    pairs = set(zip(e["held_class"], e["acquired_class"]))
    # a KVM_RUN holds vcpu->mutex and enters kvm->srcu (kvm_vcpu_srcu_read_lock)
    assert ("vcpu->mutex", "kvm->srcu") in pairs, pairs
    d = lo.documented(e)
    assert not d["locking_rst"].isin(["reversed", "forbidden"]).any(), d
    assert lo.inversions(e).empty and lo.recursion(rec).empty
    shinfo, vinfo = "kvm->arch.xen.shinfo_cache.lock", "vcpu->arch.xen.vcpu_info_cache.lock"
    assert (vinfo, shinfo) not in pairs and (shinfo, vinfo) not in pairs
    # both caches' locks are taken by the send ioctl, inside kvm->srcu, IRQs off (irqsave)
    cx = lo.contexts(rec)
    for cls in (shinfo, vinfo):
        rows = cx[(cx["lock_class"] == cls) & (cx["under"] == "kvm->srcu")]
        assert not rows.empty and set(rows["irqs"]) == {"off"}, cx[cx["lock_class"] == cls]


def test_compare_lists_the_vcpu_info_edges_as_new(lockorder_run):
    base = lo.edges(kvmlockprof.load(lockorder_run / "noinfo.parquet"))
    new = lo.edges(kvmlockprof.load(lockorder_run / "info.parquet"))
    key = lambda df: set(zip(df["held_class"], df["acquired_class"]))  # noqa: E731
    added = key(new) - key(base)
    print("edges only with vcpu_info set:", sorted(added))
    assert any(a.startswith("vcpu->arch.xen.vcpu_info_cache") for _, a in added), added
    cmp = (lockorder_run / "cmp.txt").read_text()
    h, a = next((h, a) for h, a in sorted(added) if a.startswith("vcpu->arch.xen.vcpu_info"))
    assert f"order {h} -> {a}" in cmp, cmp


def test_nothing_left_behind(lockorder_run):
    """lockorder attaches ~40 kprobes: once both records ended, the kernel's view
    (bpftool, kprobe_events) holds none of ours."""
    rec = kvmlockprof.load(lockorder_run / "info.parquet")
    targets = rec.manifest["probes"]["lockorder"]["targets"]
    attached = {k: v for k, v in targets.items() if v["method"]}
    print(f"{len(attached)} of {len(targets)} lockorder targets attached; not: "
          f"{ {k: v.get('error') or 'off' for k, v in targets.items() if not v['method']} }")
    assert len(attached) >= 20
    progs = (lockorder_run / "progs.txt").read_text()
    kprobes = (lockorder_run / "kprobes.txt").read_text()
    assert "kvmlp" not in progs and "kvmlp" not in kprobes and not kprobes.strip(), \
        (progs, kprobes)


def test_srcu_held_at_chosen_functions(lockorder_run):
    """--srcu-at: every KVM_XEN_HVM_EVTCHN_SEND calls kvm_xen_set_evtchn_fast once
    with no SRCU read section held (the workload's count of those ioctls is the
    oracle); kvm_gpc_check runs with kvm->srcu held."""
    rec = kvmlockprof.load(lockorder_run / "info.parquet")
    at = lo.srcu_at(rec)
    print(at.to_string())
    assert rec.manifest["probes"]["lockorder"]["srcu_at"] == list(SRCU_AT)
    fast = at[at["function"] == "kvm_xen_set_evtchn_fast"]
    none = int(fast[fast["srcu_held"] == "none"]["calls"].sum())
    assert none == rec.manifest["work"]["xen_sends"] > 0, (none, rec.manifest["work"])
    check = at[at["function"] == "kvm_gpc_check"]
    assert set(check["srcu_held"]) == {"kvm->srcu"}, check


def test_lockorder_cost_watched_and_not(lockorder_run):
    """Calls/s and ns a call of the lock entry points (bpf_stats, TCG: slow), with no
    VM (every lock unwatched: one page lookup) and with the Xen workload."""
    out = {}
    for name in ("idle", "info"):
        rec = kvmlockprof.load(lockorder_run / f"{name}.parquet")
        cost = rec.manifest["probe_cost"]["lockorder"]
        c = rec.manifest["probe_counters"]["lockorder"]
        out[name] = (cost["calls_per_s"], cost["ns_per_call"], cost["cpu_share"],
                     c["watched"] + c["releases"])
        print(f"lockorder {name}: {cost['calls_per_s']:.0f} calls/s, "
              f"{cost['ns_per_call']:.0f} ns a call, {cost['cpu_share']:.2%} of a CPU; "
              f"watched lock operations {c['watched'] + c['releases']}")
    assert out["idle"][3] == 0 and out["info"][3] > 0
