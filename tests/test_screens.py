"""What the first screen of report and top says about the probes: short where nothing
is wrong, the whole reasons on request (-v, doctor, the HTML's collapsed lines)."""
from kvmlockprof.views import report

FENTRY = ("fentry: the kernel refused the tracing program with EPERM although we are "
          "privileged (lockdown, or no ftrace direct calls in this kernel)")
KPROBE = ("kprobe: kernel has no kprobes (CONFIG_KPROBES=n: no kprobe PMU, no "
          "kprobe_events); kprobe programs load but cannot attach")
# the statuses of this development host (no kprobes, fentry refused, no KVM_XEN, x86)
HOST = {"contention": {"status": "attached", "method": "raw_tracepoint"},
        "vms": {"status": "unavailable", "reason": f"kvm_vm_ioctl: {FENTRY}; {KPROBE}"},
        "xen_evtchn": {"status": "unavailable", "reason": "no symbol "
                       "kvm_xen_set_evtchn_fast in this kernel (CONFIG_KVM_XEN=n)"},
        "gpc": {"status": "unavailable", "reason": f"kvm_gpc_refresh: {FENTRY}; {KPROBE}"},
        "srcu": {"status": "unavailable", "reason": f"__srcu_read_lock: {FENTRY}; {KPROBE}"},
        "xarray": {"status": "unavailable", "reason": f"xa_erase: {KPROBE}; lib/ is built "
                   "without ftrace hooks: no fentry, and kprobes only where "
                   f"CONFIG_KPROBE_EVENTS_ON_NOTRACE=y | kvm_arch_vcpu_destroy: {FENTRY}; "
                   f"{KPROBE}"},
        "vgic": {"status": "unavailable", "reason": "x86_64 host: this probe is for aarch64"},
        "lockorder": {"status": "unavailable", "reason": f"kvm_vm_ioctl: {KPROBE}; {FENTRY}"},
        "other": {"status": "not requested"}}


def test_probe_status_in_two_lines_grouped_by_why():
    lines = report.probe_lines(HOST)
    assert lines == [
        "probes attached: contention (raw_tracepoint)",
        "not attached: vms, gpc, srcu, lockorder (no kprobes, fentry refused); xen_evtchn "
        "(no kvm_xen_set_evtchn_fast: CONFIG_KVM_XEN=n); xarray (no kprobes, fentry "
        "refused, no fentry in lib/); vgic (aarch64 only) (-v or `kvmlockprof doctor`: why)"]
    assert sum(map(len, lines)) < 400           # was 7 lines of ~250 characters


def test_verbose_has_every_reason_whole():
    lines = report.probe_lines(HOST, verbose=True)
    assert len(lines) == len(HOST)
    for name, st in HOST.items():
        if st.get("reason"):
            assert any(name in x and st["reason"] in x for x in lines), name


def test_an_unknown_reason_is_cut_not_lost():
    assert report.short_reason("x" * 300) == "x" * 80
    assert report.short_reason(None) == "?"
