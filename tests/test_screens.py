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


def test_reasons_said_short():
    assert report.short_reason("no symbol a / b in this kernel") == "no a / b"
    assert report.short_reason("no symbol x in this kernel (CONFIG_X=n)") == \
        "no x: CONFIG_X=n"


def test_an_unknown_reason_is_cut_not_lost():
    assert report.short_reason("x" * 300) == "x" * 80
    assert report.short_reason(None) == "?"


def test_histogram_labels_read_as_powers_of_two():
    from kvmlockprof.views.plots import bucket_label
    assert bucket_label(1024, 2048) == "1-2 us"
    assert bucket_label(256, 512) == "256-512 ns"
    assert bucket_label(512, 1024) == "512 ns-1 us"
    assert bucket_label(2 ** 30, 2 ** 31) == "1-2 s"


def test_histogram_has_every_heavy_lock_and_its_waits(tmp_path):
    """Made-up waits (tests_support's rows), the figure's cells: a row per lock, each
    wait counted in the bucket [2^k, 2^(k+1)) ns its duration falls in."""
    import numpy as np

    import kvmlockprof
    from kvmlockprof.views import plots
    from tests_support import ROWS, small_recording
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    heat = plots.wait_histogram(rec).data[0]
    counts = np.asarray(heat.customdata)[:, :, 0].astype(float)
    by_lock = {}
    for w, lock, *_ in ROWS:
        k = int(np.floor(np.log2(w)))
        label = plots.bucket_label(2 ** k, 2 ** (k + 1))
        by_lock.setdefault(f"{lock:#x}", {}).setdefault(label, 0)
        by_lock[f"{lock:#x}"][label] += 1
    assert sorted(heat.y) == sorted(by_lock)
    for i, lock in enumerate(heat.y):
        assert {x: c for x, c in zip(heat.x, counts[i]) if c} == by_lock[lock], lock


def test_flagged_distributions_read_from_fast_to_slow(tmp_path):
    """A lock that got faster: NEW's new fast bucket is drawn left of BASE's, with the
    empty bucket between them on the axis (its buckets in order, not as met)."""
    import kvmlockprof
    from kvmlockprof.analysis import compare
    from kvmlockprof.views import plots
    from tests_support import small_recording
    base = [(w, 0x1000, 7, 32, 1) for w in range(2100, 4000, 10)]
    new = [(w, 0x1000, 7, 32, 1) for w in range(600, 1000, 2)] + base[:5]
    b = [kvmlockprof.load(small_recording(tmp_path / "b.parquet", base))]
    n = [kvmlockprof.load(small_recording(tmp_path / "n.parquet", new))]
    df = compare.compare(b, n).assign(name="kvm->slots_lock mutex @ x")   # (a named lock)
    for r in (b[0], n[0]):
        r.manifest["lock_names"] = {"0x1000": {"name": "kvm(7)->slots_lock"}}
    fig = plots.compare_distributions(df, b, n)
    assert list(fig.layout.xaxis.categoryarray) == ["512 ns-1 us", "1-2 us", "2-4 us"]
