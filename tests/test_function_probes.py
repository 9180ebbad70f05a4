"""The function probes' BPF C: verified here in its kprobe flavour, and its
decoding/analysis checked on event arrays in the exact layout bcc parsed from
the C (the probes cannot attach on a kernel without kprobes/fentry; the lab
runs them live)."""
import errno

import numpy as np
import pytest

import kvmlockprof
from kvmlockprof import catalog
from kvmlockprof.kernel import bpfload, btf
from kvmlockprof.kernel.maps import read_hash
from kvmlockprof.probes import gpc, srcu, vgic, xarray, xen_evtchn
from kvmlockprof.probes.functions import (SHARED_FENTRY, FunctionProbes, dispatch_source,
                                          forced_plans, module_defines, shared_fentry)
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import Writer

FUNCTION_PROBES = [p for p in catalog.CATALOG if p.name != "contention"]


@pytest.fixture(scope="module")
def kbtf(bpf_host):
    return btf.Btf()


@pytest.fixture(scope="module")
def module(kbtf):
    fp = FunctionProbes(forced_plans(FUNCTION_PROBES, catalog.KPROBE), kbtf, attach=False)
    yield fp
    fp.close()


def test_kprobe_flavours_pass_the_verifier(module):
    module.load_kprobe_handlers()
    loaded = {n.decode() if isinstance(n, bytes) else n for n in module.bpf.funcs}
    for p in FUNCTION_PROBES:
        for fn, _, _ in module.kprobe_functions(p):
            assert fn in loaded


@pytest.mark.parametrize("probe", FUNCTION_PROBES, ids=lambda p: p.name)
def test_fentry_flavours_compile(kbtf, probe):
    """Compiles; on a kernel that refuses fentry (or lacks the symbol) only the load fails."""
    try:
        FunctionProbes(forced_plans([probe], catalog.FENTRY), kbtf, attach=False).close()
    except bpfload.BpfUnavailable as e:
        assert "Failed to compile" not in str(e), str(e)


def test_fentry_flavours_compile_together(kbtf):
    """Every function probe in one module, as `record` loads them, in the fentry
    flavour: bcc allows one fentry program per symbol and module, so targets that
    share a symbol (kvm_arch_vcpu_destroy: vms and xarray) go through one program
    that calls each handler. On this kernel (no fentry) only the load fails."""
    plans = forced_plans(FUNCTION_PROBES, catalog.FENTRY)
    shared = {sym: {t.key for t in ts} for sym, ts in shared_fentry(plans).items()}
    assert shared["kvm_arch_vcpu_destroy"] == {"VCPU_DESTROY", "VCPU_TEARDOWN"}, shared
    src = dispatch_source(plans)
    assert "KFUNC_PROBE(kvm_arch_vcpu_destroy)" in src and "kvmlp_fe__VCPU_TEARDOWN(ctx);" in src
    defines = module_defines(plans, kbtf)
    assert defines["KVMLP_M_VCPU_TEARDOWN"] == defines["KVMLP_M_VCPU_DESTROY"] == SHARED_FENTRY
    assert shared["kvm_vm_ioctl"] == {"VM_IOCTL", "LOVM"}, shared     # vms and lockorder
    assert defines["KVMLP_M_GPC_REFRESH"] == catalog.METHOD_CODE[catalog.FENTRY]
    try:
        FunctionProbes(plans, kbtf, attach=False).close()
    except bpfload.BpfUnavailable as e:
        assert "Failed to compile" not in str(e), str(e)


RETURN_READS_ARG = """
KVMLP_ENTRY(T)
{
	return kvmlp_call_enter(1, KVMLP_ARG(T, FILE), 0);
}

KVMLP_RETURN(T)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(1, &c))
		return 0;
	return (KVMLP_ARG(T, FILE) == c.a0) + (int)KVMLP_RET(T);
}
"""


@pytest.mark.parametrize("method", [catalog.KPROBE, catalog.FENTRY])
def test_return_handlers_cannot_read_arguments_as_kretprobes(bpf_host, method):
    """A kretprobe's argument registers hold garbage by the return (vgic read `kvm`
    there): in that flavour KVMLP_ARG in a return handler does not compile, so no probe
    can ship the mistake (test_kprobe_flavours_pass_the_verifier compiles them all);
    fexit does see the arguments. The same handler reading its saved copy compiles."""
    defines = {"KVMLP_NR_COUNTERS": 1, "KVMLP_STACK_ENTRIES": 1024,
               "KVMLP_M_T": catalog.METHOD_CODE[method], "KVMLP_S_T": "vfs_read",
               "KVMLP_N_T": 3, "KVMLP_A_T_FILE": 0}
    common = (bpfload.BPF_DIR / "common.h").read_text()

    def compiles(text):
        try:
            bpfload.compile_bpf(text=common + text, defines=defines).cleanup()
        except bpfload.BpfUnavailable as e:
            if "Failed to compile" in str(e):
                return str(e)
        return ""                   # compiled (loading an fentry may fail here: fine)
    err = compiles(RETURN_READS_ARG)
    if method == catalog.KPROBE:
        assert "undeclared identifier 'ctx'" in err, err
    else:
        assert not err, err
    assert not compiles(RETURN_READS_ARG.replace("KVMLP_ARG(T, FILE) == c.a0", "c.a0"))


def empty_like(module, table):
    """A zeroed array of n rows in the layout a map/ring of the module carries."""
    dtypes = module.event_dtypes()
    if table in dtypes:
        return lambda n: np.zeros(n, dtypes[table])
    mapname = next(m for p in FUNCTION_PROBES for m, t in p.aggregates if t == table)
    dt = read_hash(module.bpf[mapname]).dtype
    return lambda n: np.zeros(n, dt)


def write_recording(path, tables, stacks=None):
    w = Writer(path)
    for name, arr in tables.items():
        w.append(name, to_arrow(arr))
    if stacks is not None:
        w.append("stacks", stacks)
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {}})
    return kvmlockprof.load(path)


def test_xen_hit_ratio(module, tmp_path):
    ev = empty_like(module, "xen_evtchn")(6)
    ev["kvm"], ev["tgid"] = 0xffff888100000000, 42
    ev["ret"] = [1, 1, 0, -errno.EWOULDBLOCK, -errno.ENOTCONN, 1]
    ev["slow"] = [0, 0, 0, 0, 0, 1]
    rec = write_recording(tmp_path / "x.parquet", {"xen_evtchn": ev})
    out = xen_evtchn.outcomes(rec)
    assert list(out["outcome"][:5]) == ["delivered", "delivered", "already pending",
                                        "fell back (slow path)", "masked"]
    r = xen_evtchn.hit_ratio(rec).iloc[0]
    assert (r["fast_calls"], r["fell_back"], r["slow_calls"]) == (5, 1, 1)
    assert r["hit_ratio"] == pytest.approx(0.8)


def test_gpc_checks_and_refreshes(module, tmp_path):
    ops = empty_like(module, "gpc_ops")(3)
    ops["gpc"], ops["kvm"], ops["tgid"], ops["place"] = 0x1000, 0x2000, 7, 2
    ops["op"] = [1, 0, 2]            # enum gpc_op: hit, miss, activate
    ops["count"] = [90, 10, 1]
    ref = empty_like(module, "gpc_refresh")(4)
    ref["gpc"], ref["kvm"], ref["tgid"], ref["place"] = 0x1000, 0x2000, 7, 2
    ref["lat_ns"] = [100, 200, 300, 400]
    rec = write_recording(tmp_path / "g.parquet", {"gpc_ops": ops, "gpc_refresh": ref})
    c = gpc.checks(rec).iloc[0]
    assert c["place_name"] == "vcpu->arch.pv_time"
    assert (c["check_hit"], c["check_miss"], c["activate"]) == (90, 10, 1)
    assert c["hit_ratio"] == pytest.approx(0.9)
    r = gpc.refreshes(rec).iloc[0]
    assert r["count"] == 4 and r["p50_ns"] == np.percentile([100, 200, 300, 400], 50,
                                                           method="inverted_cdf")


def test_srcu_sections_and_syncs(module, tmp_path):
    import pyarrow as pa
    sec = empty_like(module, "srcu_sections")(2)
    sec["ssp"], sec["kind"], sec["count"] = [0x10, 0x20], [1, 0], [3, 1]
    sec["total_ns"], sec["max_ns"] = [600, 50], [300, 50]
    # bcc's bpf_log2l() slots: 8 holds 128-255 ns, 9 holds 256-511
    sec["hist"][0, 8], sec["hist"][0, 9], sec["hist"][1, 6] = 2, 1, 1
    sync = empty_like(module, "srcu_sync")(3)
    sync["type"] = [2, 2, 0]                 # two expedited waits, one sampled section
    sync["ssp"], sync["kind"], sync["dur_ns"], sync["stack_id"] = 0x10, 1, [1000, 3000, 5], 4
    stacks = pa.table({"source": ["functions"], "stack_id": pa.array([4], pa.int32()),
                       "addrs": pa.array([[1, 2]], pa.list_(pa.uint64())),
                       "frames": [["synchronize_srcu_expedited+0x0", "kvm_set_memslot+0x9"]],
                       "lock_frame": [[False, False]]})
    rec = write_recording(tmp_path / "s.parquet", {"srcu_sections": sec, "srcu_sync": sync},
                          stacks)
    s = srcu.sections(rec)
    top = s.iloc[0]
    assert top["kind"] == "kvm->srcu" and top["count"] == 3
    assert top["p50_ns_bound"] == 256.0 and top["p99_ns_bound"] == 512.0
    w = srcu.syncs(rec).iloc[0]
    assert w["wait"] == "synchronize_srcu_expedited" and w["kind_name"] == "kvm->srcu"
    assert w["caller"] == "kvm_set_memslot+0x9" and w["count"] == 2
    assert w["p50_ns"] == 1000.0            # nearest rank of 1000, 3000


def test_xa_erases_kvm_owned(module, tmp_path):
    agg = empty_like(module, "xa_erase_agg")(2)
    agg["owner"], agg["kvm"], agg["count"], agg["total_ns"] = [1, 0], [0x2000, 0], [4, 100], \
        [400, 1000]
    agg["stack_id"] = -1
    rec = write_recording(tmp_path / "a.parquet", {"xa_erase_agg": agg})
    out = xarray.erases(rec)
    kvm = out[out["owner_name"] == "kvm->vcpu_array"].iloc[0]
    assert kvm["count"] == 4 and kvm["mean_ns"] == 100


def test_vgic_puts(module, tmp_path):
    ev = empty_like(module, "vgic")(3)
    ev["intid"] = [8192, 27, 0xFFFFFFFF]
    ev["refcount"] = [1, 2, 1]
    ev["irqs_off"] = [1, 0, 2]
    ev["lat_ns"] = [10, 20, 30]
    rec = write_recording(tmp_path / "v.parquet", {"vgic": ev})
    out = vgic.puts(rec)
    lpi = out[out["lpi"]].iloc[0]
    assert lpi["released"] and lpi["irqs_off"] == "off"
    assert len(out) == 3


def test_vgic_contexts_per_caller(module, tmp_path):
    """Which contexts take lpi_xa's lock: LPI puts and releases per context (enum values as
    the C states them); no stacks recorded, so callers read "?"."""
    ev = empty_like(module, "vgic")(5)
    ev["intid"] = [8192, 8193, 8192, 8194, 27]
    ev["refcount"] = [1, 2, 1, 1, 1]
    ev["irqs_off"] = [vgic.IRQS_OFF, vgic.IRQS_OFF, 1 - vgic.IRQS_OFF, 1 - vgic.IRQS_OFF,
                      vgic.IRQS_OFF]
    ev["stack_id"] = -1
    rec = write_recording(tmp_path / "v.parquet", {"vgic": ev})
    out = vgic.contexts(rec).set_index("irqs_off")
    assert out.loc["off", "puts"] == 2 and out.loc["off", "releases"] == 1
    assert out.loc["on", "puts"] == 2 and out.loc["on", "releases"] == 2
    assert out.loc["on", "distinct_lpis"] == 2 and set(out["context"]) == {"task"}


def test_registry_lifetimes_in_the_maps_layout(module, tmp_path):
    """The registry maps as record reads them (the live ones and those of ended
    lifetimes, in the layout bcc parsed from common.h): an address reused by a
    second VM keeps both owners, in the recording's vms/vcpus tables too."""
    from kvmlockprof.recording.locknames import REGISTRY_TABLES, Registry
    from kvmlockprof.probes.functions import SHARED_TABLES
    layout = {table: read_hash(module.bpf[m], key_name=key).dtype
              for m, table, key in SHARED_TABLES}
    assert set(layout) == set(REGISTRY_TABLES)
    kvm, vcpu = 0xffffc90001230000, 0xffff888104560000
    maps = {t: np.zeros(1, dt) for t, dt in layout.items()}

    def put(table, **values):           # by the field names the C gave them
        for name, v in values.items():
            maps[table][name] = v
    put("vm_ends", kvm=kvm, first_ns=10, tgid=100, end_ns=70)
    put("vms", kvm=kvm, tgid=200, first_ns=80)
    put("vcpu_ends", vcpu=vcpu, first_ns=11, kvm=kvm, tid=101, tgid=100, end_ns=69)
    put("vcpus", vcpu=vcpu, kvm=kvm, tid=201, tgid=200, vcpu_idx=0, first_ns=81)
    reg = Registry()
    reg.observe(**{t: to_arrow(a) for t, a in maps.items()}, now_ns=90)
    w = Writer(tmp_path / "reg.parquet")
    for table, t in reg.tables().items():
        w.snapshot(table, t)
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {}})
    rec = kvmlockprof.load(tmp_path / "reg.parquet")
    vms, vcpus = rec.table("vms"), rec.table("vcpus")
    assert list(zip(vms["kvm"], vms["tgid"], vms["end_ns"])) == [(kvm, 100, 70), (kvm, 200, 0)]
    assert list(zip(vcpus["tid"], vcpus["end_ns"])) == [(101, 69), (201, 0)]


def test_every_probe_with_data_gets_a_plot_panel(module, tmp_path):
    """The HTML report draws one panel per function probe that has data."""
    from kvmlockprof.views import html, plots, report
    n = 4
    tables = {t: empty_like(module, t)(n) for t in
              ("xen_evtchn", "gpc_ops", "gpc_refresh", "srcu_sections", "srcu_sync",
               "xa_erase_agg", "vgic", "lockorder_edges")}
    tables["gpc_ops"]["count"] = 1
    tables["gpc_refresh"]["lat_ns"] = [100, 200, 300, 400]
    tables["srcu_sections"]["count"], tables["srcu_sections"]["hist"][:, 7] = 1, 1
    tables["srcu_sync"]["type"], tables["srcu_sync"]["dur_ns"] = 1, [10, 20, 30, 40]
    tables["xa_erase_agg"]["count"], tables["xa_erase_agg"]["stack_id"] = 1, -1
    tables["vgic"]["intid"], tables["vgic"]["stack_id"] = 8192, -1      # LPIs
    e = tables["lockorder_edges"]
    e["held"], e["acquired"], e["count"], e["stack_id"] = 0x10, [0x20, 0x30, 0x40, 0x50], 1, -1
    rec = write_recording(tmp_path / "all.parquet", tables)
    figs = plots.probe_figures(rec)
    assert set(figs) == {sec.key for sec in report.probe_sections() if sec.figure}
    page = html.render(rec)
    for sec in report.probe_sections():
        if not sec.frame(rec).empty:
            assert sec.title.split(" (")[0].replace(">", "&gt;") in page


def _lockorder_recording(module, tmp_path, name, edges, acqs, recursion=(),
                         acqs_columns=None):
    """A recording of the lockorder tables in the layout bcc parsed from the C: one VM
    (base KVM) with one vCPU (base VCPU), lock names as `record` writes them. An
    acquisition is (lock, context, IRQs while held, under, count) and optionally
    {"kind", "softirqs", "irqs_at_call"} (else the lock's kind, softirqs on, IRQs at
    the call as while held); a recursion is a lock or (lock, kind, held as[, what]),
    what one of lo.EVENTS' labels (recursion, a lock held on leaving).
    acqs_columns: only these columns of lockorder_acqs (an older recording's)."""
    from kvmlockprof.probes import lockorder as lo
    kind = {v: k for k, v in lo.KINDS.items()}
    ctx = {v: k for k, v in lo.CONTEXTS.items()}
    irqs = {v: k for k, v in lo.IRQS.items()}
    e = empty_like(module, "lockorder_edges")(len(edges))
    for i, (h, a, n, *kinds) in enumerate(edges):
        hk, ak = kinds or (LO_KIND[h], LO_KIND[a])
        e[i]["held"], e[i]["acquired"], e[i]["count"] = LO_ADDR[h], LO_ADDR[a], n
        e[i]["held_kind"], e[i]["acquired_kind"] = kind[hk], kind[ak]
    e["stack_id"] = -1
    q = empty_like(module, "lockorder_acqs")(len(acqs))
    for i, (lock, c, irq, under, n, *more) in enumerate(acqs):
        more = more[0] if more else {}
        q[i]["addr"], q[i]["kind"], q[i]["context"], q[i]["irqs"] = \
            LO_ADDR[lock], kind[more.get("kind", LO_KIND[lock])], ctx[c], irqs[irq]
        q[i]["irqs_at_call"] = irqs[more.get("irqs_at_call", irq)]
        q[i]["softirqs"] = irqs[more.get("softirqs", "on")]
        q[i]["outer"], q[i]["count"] = LO_ADDR.get(under, 0), n
    q["stack_id"] = -1
    if acqs_columns is not None:
        q = q[list(acqs_columns)]
    r = empty_like(module, "lockorder_recursion")(len(recursion))
    what = {v: k for k, v in lo.EVENTS.items()}
    for i, lock in enumerate(recursion):
        lock, k, held_as, *ev = (lock, LO_KIND[lock], LO_KIND[lock]) \
            if isinstance(lock, str) else lock
        r[i]["addr"], r[i]["kind"], r[i]["held_kind"] = LO_ADDR[lock], kind[k], kind[held_as]
        r[i]["what"] = what[ev[0] if ev else "recursion"]
    r["stack_id"] = r["held_stack_id"] = -1
    w = Writer(tmp_path / name)
    for t, arr in (("lockorder_edges", e), ("lockorder_acqs", q), ("lockorder_recursion", r)):
        w.append(t, to_arrow(arr))
    names = {f"{a:#x}": {"name": n.replace("kvm->", "kvm(42)->", 1).replace(
        "vcpu->", "kvm(42)->vcpu0->", 1), "how": "test"} for n, a in LO_ADDR.items()
        if not n.startswith("unnamed")}
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {},
                "lock_names": names,
                "kvm_objects": {"vms": {f"{LO_KVM:#x}": {}}, "vcpus": {f"{LO_VCPU:#x}": {}},
                                "layout": {"kvm": {"container": "kvm_vmx", "size": 40000},
                                           "kvm_vcpu": {"container": "vcpu_vmx",
                                                        "size": 0x8000}}}})
    return kvmlockprof.load(tmp_path / name)


LO_KVM, LO_VCPU = 0xffffc90001000000, 0xffff888104000000
LO_ADDR = {"kvm->lock": LO_KVM + 0x10, "kvm->slots_lock": LO_KVM + 0x40,
           "kvm->srcu": LO_KVM + 0x100, "kvm->arch.xen.shinfo_cache.lock": LO_KVM + 0x900,
           "kvm->mmu_lock": LO_KVM + 0x1000, "kvm->arch.tdp_mmu_pages_lock": LO_KVM + 0x2000,
           "kvm->arch.apicv_update_lock": LO_KVM + 0x3000, "vcpu->mutex": LO_VCPU + 0x20,
           "vcpu->arch.xen.vcpu_info_cache.lock": LO_VCPU + 0x700,
           "unnamed": LO_VCPU + 0x7777}
LO_KIND = {"kvm->lock": "mutex", "kvm->slots_lock": "mutex", "kvm->srcu": "srcu read",
           "kvm->arch.xen.shinfo_cache.lock": "read", "kvm->mmu_lock": "write",
           "kvm->arch.tdp_mmu_pages_lock": "spin", "kvm->arch.apicv_update_lock": "rwsem read",
           "vcpu->mutex": "mutex",
           "vcpu->arch.xen.vcpu_info_cache.lock": "write", "unnamed": "spin"}


def test_lockorder_finds_inversion_recursion_and_irq_conflicts(module, tmp_path):
    """Hand-built maps: an ABBA pair, a recursive acquisition, a lock taken in IRQ
    context and held with IRQs on elsewhere, and an edge locking.rst forbids."""
    from kvmlockprof.probes import lockorder as lo
    rec = _lockorder_recording(module, tmp_path, "lo.parquet", edges=[
        ("vcpu->mutex", "kvm->lock", 3),                # reversed: kvm->lock is outside
        ("kvm->lock", "vcpu->mutex", 5),
        ("kvm->lock", "kvm->slots_lock", 7),            # documented
        ("kvm->srcu", "kvm->slots_lock", 1),            # forbidden under kvm->srcu
        ("vcpu->arch.xen.vcpu_info_cache.lock", "unnamed", 2)],
        acqs=[("vcpu->arch.xen.vcpu_info_cache.lock", "hardirq", "off", "", 4),
              ("vcpu->arch.xen.vcpu_info_cache.lock", "task", "on", "vcpu->mutex", 9),
              ("kvm->arch.xen.shinfo_cache.lock", "hardirq", "off", "kvm->srcu", 6),
              ("kvm->arch.xen.shinfo_cache.lock", "task", "on", "", 6)],   # readers: fine
        recursion=["kvm->slots_lock"])
    e = lo.edges(rec)
    assert len(e) == 5 and "vcpu->+0x7777" in set(e["acquired_class"])
    inv = lo.inversions(e)
    assert list(zip(inv["a"], inv["b"])) == [("kvm->lock", "vcpu->mutex")]
    assert set(inv.iloc[0][["a_then_b", "b_then_a"]]) == {3, 5}
    d = lo.documented(e).set_index(["held_class", "acquired_class"])["locking_rst"]
    assert d[("vcpu->mutex", "kvm->lock")] == "reversed"
    assert d[("kvm->lock", "vcpu->mutex")] == "documented"
    assert d[("kvm->srcu", "kvm->slots_lock")] == "forbidden"
    cx = lo.contexts(rec)
    assert set(cx[cx["lock_class"] == "kvm->arch.xen.shinfo_cache.lock"]["under"]) == \
        {"kvm->srcu", ""}
    conf = lo.irq_conflicts(cx)
    assert list(conf["lock_class"]) == ["vcpu->arch.xen.vcpu_info_cache.lock"]
    assert (conf.iloc[0]["in_irq"], conf.iloc[0]["irqs_on_elsewhere"]) == (4, 9)
    assert list(lo.recursion(rec)["lock_class"]) == ["kvm->slots_lock"]
    f = lo.findings(rec)
    assert sorted(f["finding"]) == ["IRQ conflict", "inversion", "locking.rst: forbidden",
                                    "locking.rst: reversed", "recursion"]
    assert lo.order_figure(rec) is not None


def test_lockorder_tells_locks_held_on_leaving(module, tmp_path):
    """The streamed events tell a recursion from a lock still held as its task
    returned to user space or exited (lockdep's "lock held when returning to user
    space!" and "still has locks held!"): each its own finding."""
    from kvmlockprof.probes import lockorder as lo
    rec = _lockorder_recording(module, tmp_path, "lo.parquet", edges=[], acqs=[
        ("kvm->slots_lock", "task", "on", "", 1)], recursion=[
        "kvm->lock",
        ("kvm->slots_lock", "mutex", "mutex", "held at return to user space"),
        ("kvm->slots_lock", "mutex", "mutex", "held at exit")])
    assert list(lo.recursion(rec)["lock_class"]) == ["kvm->lock"]
    held = lo.held_on_leaving(rec)
    assert list(zip(held["event"], held["lock_class"], held["kind"])) == [
        ("held at return to user space", "kvm->slots_lock", "mutex"),
        ("held at exit", "kvm->slots_lock", "mutex")]
    f = lo.findings(rec)
    assert sorted(f["finding"]) == ["held at exit", "held at return to user space",
                                    "recursion"]


def test_lockorder_reads_a_recording_made_before_softirqs_were(module, tmp_path):
    """lockorder_acqs without its softirqs column (recordings before it) loads: the
    softirqs are "unknown", and a lock taken in softirq context and with IRQs on in
    a task is still a conflict (as lockdep's softirqs_enabled is on by default)."""
    from kvmlockprof.probes import lockorder as lo
    lock = "vcpu->arch.xen.vcpu_info_cache.lock"
    rec = _lockorder_recording(
        module, tmp_path, "old.parquet", edges=[],
        acqs=[(lock, "softirq", "on", "", 2), (lock, "task", "on", "", 3)],
        acqs_columns=("addr", "outer", "kind", "context", "irqs", "irqs_at_call",
                      "count", "stack_id", "tgid"))
    assert "softirqs" not in rec.table("lockorder_acqs")
    cx = lo.contexts(rec)
    assert set(cx["softirqs"]) == {"unknown"}
    assert list(lo.irq_conflicts(cx)["lock_class"]) == [lock]


def test_lockorder_srcu_read_sections_are_no_inversion_but_a_grace_period_is(module,
                                                                              tmp_path):
    """A mutex inside kvm->srcu and kvm->srcu inside it (readers) cannot deadlock;
    synchronize_srcu(&kvm->srcu) inside the mutex, beside the mutex in a read
    section, can (locking.rst's reason for kvm->slots_lock)."""
    from kvmlockprof.probes import lockorder as lo
    readers = [("kvm->srcu", "kvm->lock", 3), ("kvm->lock", "kvm->srcu", 2)]
    rec = _lockorder_recording(module, tmp_path, "r.parquet", edges=readers, acqs=[])
    assert lo.inversions(lo.edges(rec)).empty
    rec = _lockorder_recording(module, tmp_path, "s.parquet", acqs=[], edges=readers + [
        ("kvm->lock", "kvm->srcu", 1, "mutex", "srcu sync")])
    inv = lo.inversions(lo.edges(rec))
    assert list(zip(inv["a"], inv["b"])) == [("kvm->lock", "kvm->srcu")]


def test_lockorder_softirq_safe_lock_held_with_bh_off_is_no_irq_conflict(module, tmp_path):
    """lockdep's IRQ-safety states are per state: a lock taken in softirq context is
    softirq-safe; held elsewhere under spin_lock_bh it is hardirq-unsafe, never
    softirq-unsafe. With softirqs on it is softirq-unsafe: a conflict."""
    from kvmlockprof.probes import lockorder as lo
    lock, off = "kvm->arch.tdp_mmu_pages_lock", {"softirqs": "off"}

    def conflicts(*acqs):
        rec = _lockorder_recording(module, tmp_path, "bh.parquet", edges=[], acqs=acqs)
        return lo.irq_conflicts(lo.contexts(rec))
    in_softirq = (lock, "softirq", "on", "", 4, off)
    # lib/locking-selftest.c, hardirq_deadlock_softirq_not_deadlock(): lock_D taken in
    # softirq and under SOFTIRQ_DISABLE() is no report of its own (mark_usage() marks
    # ENABLED_SOFTIRQ only with curr->softirqs_enabled)
    assert conflicts(in_softirq, (lock, "task", "on", "", 9, off)).empty
    # x86: a softirq on the IRQ stack is "irq" with IRQs on at the call
    assert conflicts((lock, "irq", "on", "", 4, off), (lock, "task", "on", "", 9, off)).empty
    # irqsafe1_soft_spin ("soft-irqs-on + irq-safe-A"): expected to fail
    assert list(conflicts(in_softirq, (lock, "task", "on", "", 9))["state"]) == ["softirq"]
    # irqsafe1_hard_spin ("hard-irqs-on + irq-safe-A"): expected to fail, the
    # IRQs-on side under BH off or in a softirq all the same (ENABLED_HARDIRQ)
    in_hardirq = (lock, "hardirq", "off", "", 4, off)
    assert list(conflicts(in_hardirq, (lock, "task", "on", "", 9, off))["state"]) == \
        ["hardirq"]
    assert list(conflicts(in_hardirq, in_softirq)["state"]) == ["hardirq"]


def test_lockorder_srcu_read_in_irq_beside_synchronize_srcu_is_no_irq_conflict(module,
                                                                              tmp_path):
    """SRCU readers never wait: a kvm->srcu read section in hardirq context beside
    synchronize_srcu(&kvm->srcu) with IRQs on is no IRQ conflict, nor beside read
    sections with IRQs on. synchronize_srcu inside its own read section is lockdep's
    recursion (check_deadlock(): the sync is a write)."""
    from kvmlockprof.probes import lockorder as lo
    srcu = "kvm->srcu"
    in_irq = (srcu, "hardirq", "off", "", 3, {"softirqs": "off"})
    sync = (srcu, "task", "on", "", 2, {"kind": "srcu sync"})
    # lockdep.c mark_usage(): "For lock_sync(), don't mark the ENABLED usage"; the
    # SRCU selftests posted with it ([PATCH 3/3] WIP locking/lockdep: selftests: Add
    # selftests for SRCU, Jan 2023) expect srcu_irqsafe ("Irqsafe synchronize_srcu")
    # to pass
    rec = _lockorder_recording(module, tmp_path, "s.parquet", edges=[], acqs=[in_irq, sync])
    assert lo.irq_conflicts(lo.contexts(rec)).empty
    # mark_lock_irq(): a read usage conflicts only with a write one
    rec = _lockorder_recording(module, tmp_path, "r.parquet", edges=[],
                               acqs=[in_irq, (srcu, "task", "on", "", 5)])
    assert lo.irq_conflicts(lo.contexts(rec)).empty
    rec = _lockorder_recording(module, tmp_path, "a.parquet", edges=[], acqs=[sync],
                               recursion=[(srcu, "srcu sync", "srcu read")])
    f = lo.findings(rec)
    assert list(zip(f["finding"], f["locks"])) == [("recursion", srcu)]
    assert f.iloc[0]["seen"].startswith("srcu sync taken again")


def _inverted(module, tmp_path, edges):
    from kvmlockprof.probes import lockorder as lo
    rec = _lockorder_recording(module, tmp_path, "inv.parquet", edges=edges, acqs=[])
    return lo.inversions(lo.edges(rec))


def test_lockorder_non_recursive_read_abba_is_an_inversion(module, tmp_path):
    """A reader that queues behind a waiting writer (an rwsem's, a task's rwlock read
    on a queued rwlock) can deadlock in an ABBA with a reader on the other side; a
    recursive reader (an rwlock read in_interrupt()) cannot. Expected verdicts: the
    cases of lib/locking-selftest.c named."""
    sem, mutex = "kvm->arch.apicv_update_lock", "kvm->lock"
    # rwsem_ABBA2 ("mixed read-lock/lock-read ABBA", rsem): expected to fail
    inv = _inverted(module, tmp_path, [(sem, mutex, 3, "rwsem read", "mutex"),
                                       (mutex, sem, 2, "mutex", "rwsem read")])
    assert list(zip(inv["a"], inv["b"], inv["a_then_b"], inv["b_then_a"])) == \
        [(sem, mutex, 3, 2)]
    rw, spin = "kvm->mmu_lock", "kvm->arch.tdp_mmu_pages_lock"
    # queued_read_lock_hardirq_RE_Er: read_lock in a hardirq then spin_lock; spin_lock
    # then read_lock in a task (non-recursive): expected to fail
    inv = _inverted(module, tmp_path, [(rw, spin, 1, "recursive read", "spin"),
                                       (spin, rw, 1, "spin", "read")])
    assert list(zip(inv["a"], inv["b"])) == [(spin, rw)]
    # queued_read_lock_hardirq_ER_rE: spin_lock then read_lock in a hardirq; read_lock
    # then spin_lock in a task: expected to pass
    assert _inverted(module, tmp_path, [(spin, rw, 1, "spin", "recursive read"),
                                        (rw, spin, 1, "read", "spin")]).empty
    # rlock_ABBA2 (reads recursive there: force_read_lock_recursive): expected to pass
    assert _inverted(module, tmp_path, [(rw, spin, 1, "recursive read", "spin"),
                                        (spin, rw, 1, "spin", "recursive read")]).empty
    # rlock_ABBA1 ("mixed read-lock/lock-write ABBA"): expected to fail
    assert not _inverted(module, tmp_path, [(rw, spin, 1, "recursive read", "spin"),
                                            (spin, rw, 1, "spin", "write")]).empty


def test_lockorder_inversion_is_judged_per_pair_of_edges(module, tmp_path):
    """Two rwlocks X, Y: X read -> Y write and X write -> Y read (in an interrupt),
    and Y read -> X read (in an interrupt). Summed per class pair the kinds pair up
    (Y write against Y read, X write against X read), but no edge each way can wait
    for the other: the write of X -> Y meets a recursive read of Y, the read of
    X -> Y a recursive read of X. lockdep-design.rst: a circle deadlocks only if it is
    strong, no -(xR)-> followed by -(Sx)->, each dependency with its own types."""
    x, y = "kvm->arch.xen.shinfo_cache.lock", "kvm->mmu_lock"
    assert _inverted(module, tmp_path, [(x, y, 4, "read", "write"),
                                        (x, y, 2, "write", "recursive read"),
                                        (y, x, 3, "recursive read", "recursive read")]).empty
    # rlock_chaincache_ABBA1 (lockdep keeps the read and the write dependency of a
    # pair apart): expected to fail, through the write only
    inv = _inverted(module, tmp_path, [(x, y, 5, "recursive read", "spin"),
                                       (y, x, 7, "spin", "recursive read"),
                                       (y, x, 1, "spin", "write")])
    assert list(zip(inv["a_then_b"], inv["b_then_a"], inv["kinds"])) == \
        [(5, 1, "recursive read -> spin; spin -> write")]


def test_lockorder_compare_lists_a_new_edge(module, tmp_path):
    from kvmlockprof.analysis import compare
    base = _lockorder_recording(module, tmp_path, "b.parquet",
                                edges=[("kvm->lock", "vcpu->mutex", 5)], acqs=[])
    new = _lockorder_recording(module, tmp_path, "n.parquet",
                               edges=[("kvm->lock", "vcpu->mutex", 5),
                                      ("vcpu->arch.xen.vcpu_info_cache.lock",
                                       "kvm->arch.xen.shinfo_cache.lock", 2)], acqs=[])
    from kvmlockprof.probes import lockorder as lo
    b, n = lo.compare_values(base), lo.compare_values(new)
    key = ("order vcpu->arch.xen.vcpu_info_cache.lock -> kvm->arch.xen.shinfo_cache.lock",
           "lower", "count")
    assert key in n and key not in b
    assert compare  # the module that reads these (its own tests cover the table)


def test_lockorder_turns_off_a_lock_kind_whose_unlock_is_inlined():
    """An unlock the kernel inlined would leave phantom held locks: that kind's
    unlocks are left off (its acquisitions stay: contexts, edges into it), so the C
    does not follow it as held, and the plan says why."""
    from kvmlockprof.kernel.capabilities import Plan
    from kvmlockprof.probes import lockorder as lo
    p = catalog.BY_NAME["lockorder"]
    plan = Plan(p, {t.key: (t.symbols[0], catalog.KPROBE) for t in p.targets})
    plan.targets["LOUSF"] = (None, None)             # _raw_spin_unlock_irqrestore inlined
    lo.adjust_plan(plan)
    assert all(plan.targets[k][1] is None for k, _, _ in lo.ENTRY_POINTS["spin"][1])
    assert all(plan.targets[k][1] == catalog.KPROBE for k, _, _ in lo.ENTRY_POINTS["spin"][0])
    assert plan.targets["LOLM"][1] == catalog.KPROBE
    assert "_raw_spin_unlock_irqrestore" in plan.off["spin"]


def test_lockorder_srcu_at_is_each_plans_own(tmp_path):
    """--srcu-at reaches the lockorder probe through its plan's options: two plans
    (and two Recorders) made in one process with different lists each see their own,
    and one without the option the default: no module state carries one over."""
    from kvmlockprof.kernel.capabilities import Capabilities, Check, plan
    from kvmlockprof.probes import lockorder as lo
    from kvmlockprof.probes.sources import SessionOptions
    from kvmlockprof.recording.recorder import Recorder
    p = catalog.BY_NAME["lockorder"]
    fns = ["kvm_gpc_check", "kvm_xen_set_evtchn_fast", "kvm_gpc_refresh"]
    caps = Capabilities(checks={"kprobe attach": Check("kprobe attach", True, "")},
                        symbols={s: "" for t in p.targets for s in t.symbols + tuple(fns)})

    def slots(opts):
        got = plan(p, caps, options=opts)
        return [got.targets[f"LOAT{i}"][0] for i in range(lo.SRCU_AT_SLOTS)]
    assert slots(lo.LockorderOptions(srcu_at=tuple(fns[:2]))) == fns[:2] + [None, None]
    assert slots(lo.LockorderOptions(srcu_at=tuple(fns[2:]))) == fns[2:] + [None, None, None]
    assert slots(None) == ["kvm_vcpu_update_apicv", None, None, None]
    first = Recorder(tmp_path / "a.parquet", SessionOptions(probe_options={
        "lockorder": lo.LockorderOptions(srcu_at=tuple(fns[:2]))}))
    second = Recorder(tmp_path / "b.parquet")
    assert lo.prepare(None, first.session.probe_options["lockorder"]) == {"srcu_at": fns[:2]}
    assert lo.prepare(None, second.session.probe_options.get("lockorder")) == \
        {"srcu_at": list(lo.SRCU_AT_DEFAULT)}


def test_lockorder_srcu_at(module, tmp_path):
    """--srcu-at's table: calls per function with the SRCU section held (by class)
    or none, the slot numbers mapped to the names the manifest keeps."""
    from kvmlockprof.probes import lockorder as lo
    at = empty_like(module, "lockorder_srcu_at")(3)
    at["fn"], at["ssp"], at["count"], at["stack_id"] = [0, 0, 1], \
        [0, LO_ADDR["kvm->srcu"], LO_ADDR["kvm->srcu"]], [5, 2, 7], -1
    at["context"] = {v: k for k, v in lo.CONTEXTS.items()}["task"]
    w = Writer(tmp_path / "at.parquet")
    w.append("lockorder_srcu_at", to_arrow(at))
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {},
                "srcu_at": ["kvm_xen_set_evtchn_fast", "kvm_gpc_check"],
                "lock_names": {f"{LO_ADDR['kvm->srcu']:#x}": {"name": "kvm(7)->srcu"}}})
    out = lo.srcu_at(kvmlockprof.load(tmp_path / "at.parquet")).set_index(
        ["function", "srcu_held"])["calls"]
    assert out.to_dict() == {("kvm_gpc_check", "kvm->srcu"): 7,
                             ("kvm_xen_set_evtchn_fast", "kvm->srcu"): 2,
                             ("kvm_xen_set_evtchn_fast", "none"): 5}


def test_lockorder_watch_names_a_modules_locks_by_symbol(module, tmp_path):
    """record --watch MODULE: the module's data symbols from kallsyms become one
    watched region, written into lo_pages as the C's lo_watch() writes a KVM object,
    and its locks are named by symbol (lockdep's name for a static lock)."""
    from kvmlockprof.probes import lockorder as lo
    base = 0xffffffffc0a00ff0               # across a page boundary
    ks = tmp_path / "kallsyms"
    ks.write_text(f"{base:x} d abba_spin_a\t[zoo]\n{base + 0x18:x} b abba_spin_b\t[zoo]\n"
                  f"{base - 0x5000:x} t zoo_init\t[zoo]\n"
                  f"ffffffff81000000 T _stext\nffffffff82000000 D some_var\n"
                  f"ffffffff82000040 D next_var\n")
    (w,) = lo.resolve_watch(["zoo"], kallsyms=ks)
    assert (w["base"], w["size"]) == (base, 0x18 + lo.LAST_SYMBOL_BYTES)
    assert w["symbols"] == {f"{base:x}": "abba_spin_a", f"{base + 0x18:x}": "abba_spin_b"}
    (v,) = lo.resolve_watch(["some_var"], kallsyms=ks)
    assert (v["base"], v["size"]) == (0xffffffff82000000, 0x40)
    for bad in ("nosuch", "ffff:zz", f"{base:x}:{lo.WATCH_MAX + 1}"):
        with pytest.raises(lo.WatchError):
            lo.resolve_watch([bad], kallsyms=ks)
    st = lo.prepare(module.bpf, lo.LockorderOptions(regions=(w,)))
    pages = module.bpf["lo_pages"]
    first, second = pages[pages.Key(base >> 12)], pages[pages.Key((base >> 12) + 1)]
    assert (first.base[1], first.size[1], first.kind[1]) == (base, w["size"], lo.LO_OBJ_WATCH)
    assert (second.base[0], second.kind[0]) == (base, lo.LO_OBJ_WATCH)
    pages.clear()
    rec = _lockorder_recording(module, tmp_path, "w.parquet", edges=[], acqs=[], recursion=[])
    rec.manifest["probes"]["lockorder"] = st
    names = lo.class_names(rec, [base, base + 0x18, base + 0x1c, 0x1234])
    assert names == {base: "abba_spin_a", base + 0x18: "abba_spin_b",
                     base + 0x1c: "abba_spin_b+0x4", 0x1234: "0x1234"}


def test_lockorder_watch_a_module_whose_data_is_allocated_apart(module, tmp_path):
    """A module's data symbols may lie in allocations megabytes apart (on Debian's
    6.12 the zoo's spanned 1.8 MB in one boot, under 128 KiB in the others): a watched
    region per cluster, every lock in them named."""
    from kvmlockprof.probes import lockorder as lo
    base, far = 0xffffffffc0a00000, 0xffffffffc0bc0000
    ks = tmp_path / "kallsyms"
    ks.write_text(f"{base:x} d run_lock\t[zoo]\n{base + 0x40:x} b abba_spin_a\t[zoo]\n"
                  f"{far:x} d __param_arr\t[zoo]\n")
    regions = lo.resolve_watch(["zoo"], kallsyms=ks)
    assert [(r["base"], r["size"]) for r in regions] == \
        [(base, 0x40 + lo.LAST_SYMBOL_BYTES), (far, lo.LAST_SYMBOL_BYTES)]
    st = lo.prepare(module.bpf, lo.LockorderOptions(regions=tuple(regions)))
    pages = module.bpf["lo_pages"]
    assert pages[pages.Key(base >> 12)].kind[1] == lo.LO_OBJ_WATCH
    assert pages[pages.Key(far >> 12)].kind[1] == lo.LO_OBJ_WATCH
    pages.clear()
    rec = _lockorder_recording(module, tmp_path, "w2.parquet", edges=[], acqs=[], recursion=[])
    rec.manifest["probes"]["lockorder"] = st
    assert lo.class_names(rec, [base + 0x40, far]) == {base + 0x40: "abba_spin_a",
                                                      far: "__param_arr"}


def test_lockorder_finds_circles_of_three_and_keeps_reader_breaks(module, tmp_path):
    """A -> B -> C -> A is lockdep's circular dependency (no pair is seen both
    ways); the same circle through an SRCU read section (a recursive reader waits
    for no reader) is none."""
    from kvmlockprof.probes import lockorder as lo
    rec = _lockorder_recording(module, tmp_path, "c3.parquet", edges=[
        ("kvm->lock", "kvm->slots_lock", 1), ("kvm->slots_lock", "vcpu->mutex", 2),
        ("vcpu->mutex", "kvm->lock", 3),
        ("kvm->srcu", "kvm->arch.tdp_mmu_pages_lock", 1),
        ("kvm->arch.tdp_mmu_pages_lock", "kvm->arch.apicv_update_lock", 1),
        ("kvm->arch.apicv_update_lock", "kvm->srcu", 1)], acqs=[], recursion=[])
    e = lo.edges(rec)
    assert lo.inversions(e).empty
    c = lo.cycles(e)
    assert list(c["classes"]) == ["kvm->lock -> kvm->slots_lock -> vcpu->mutex -> kvm->lock"]
    f = lo.findings(rec)
    assert list(f[f["finding"] == "inversion"]["locks"]) == list(c["classes"]), f


def test_lockorder_irq_safe_before_irq_unsafe(module, tmp_path):
    """Lockdep's HARDIRQ-safe -> HARDIRQ-unsafe: A taken in hardirq, B held with
    IRQs on, and A -> B (here through C): no single lock is inconsistent, the order
    is the conflict. B only ever taken with IRQs off is none."""
    from kvmlockprof.probes import lockorder as lo
    a, c, b = ("vcpu->arch.xen.vcpu_info_cache.lock", "kvm->arch.tdp_mmu_pages_lock",
               "kvm->lock")
    rec = _lockorder_recording(module, tmp_path, "io.parquet",
                               edges=[(a, c, 2), (c, b, 1)],
                               acqs=[(a, "hardirq", "off", "", 4), (a, "task", "off", "", 3),
                                     (c, "task", "off", a, 2), (b, "task", "on", "", 5)],
                               recursion=[])
    cx = lo.contexts(rec)
    assert lo.irq_conflicts(cx).empty
    io = lo.irq_order_conflicts(lo.edges(rec), cx)
    assert list(zip(io["safe"], io["unsafe"], io["state"])) == [(a, b, "hardirq")], io
    assert io.iloc[0]["path"] == f"{a} -> {c} -> {b}"
    rec2 = _lockorder_recording(module, tmp_path, "io2.parquet",
                                edges=[(a, c, 2), (c, b, 1)],
                                acqs=[(a, "hardirq", "off", "", 4), (b, "task", "off", "", 5)],
                                recursion=[])
    assert lo.irq_order_conflicts(lo.edges(rec2), lo.contexts(rec2)).empty


def test_a_handler_the_verifier_refuses_fails_its_probe(module, monkeypatch):
    """An optional target whose symbol is missing is skipped; one whose handler the
    verifier refuses (6.1 refused lockorder's acquisitions while its releases loaded)
    fails the whole probe with the verifier's reason, and what attached is detached:
    a lockorder that sees releases and no acquisitions would report nothing, wrongly."""
    lo = next(p for p in FUNCTION_PROBES if p.name == "lockorder")
    plan = module.plans[lo]
    attached, detached = [], []
    refused = "kvmlp_kp_LOLM"
    log = ["0: (b7) r1 = 0", "R3 invalid mem access 'scalar'",
           "processed 599 insns (limit 1000000) max_states_per_insn 0"]

    def load_func(bpf, fn, kind):
        if fn.decode() == refused:
            raise bpfload.BpfUnavailable(f"Failed to load BPF program {fn}: Permission "
                                         f"denied: {bpfload._reason(log)}")
    monkeypatch.setattr(bpfload, "load_func", load_func)
    monkeypatch.setattr(module.bpf, "attach_kprobe",
                        lambda event, fn_name: attached.append(fn_name))
    monkeypatch.setattr(module.bpf, "detach_kprobe",
                        lambda event, fn_name: detached.append(fn_name))
    st = module._attach(lo, plan)
    assert st["status"] == "failed", st
    assert st["reason"].startswith("LOLM (mutex_lock): ") and \
        st["reason"].endswith("R3 invalid mem access 'scalar'"), st["reason"]
    assert attached and sorted(detached) == sorted(attached), (attached, detached)
    assert refused not in attached


def test_verifier_reason_is_the_line_before_its_statistics():
    lines = ["In file included from <built-in>:4:", "warning: something", "; u32 n = held->n;",
             "12: (61) r1 = *(u32 *)(r6 +0)",
             "invalid access to map value, value_size=200 off=220 size=4",
             "R6 min value is outside of the allowed memory range",
             "processed 1909 insns (limit 1000000) max_states_per_insn 5 total_states 46"]
    assert bpfload._reason(lines) == "R6 min value is outside of the allowed memory range"
    assert bpfload._reason(["error: use of undeclared identifier 'x'", "1 error generated."]) \
        == "error: use of undeclared identifier 'x'"


def test_lockorder_hold_times(module, tmp_path):
    """The holds table by lock class, kind and caller: counts and totals summed over
    addresses of one class, p50/p99 the upper bounds of the log2 buckets the holds
    fall in (2**ceil(log2)), and the contention probe's waits on the class beside."""
    from kvmlockprof.probes import lockorder as lo
    h = empty_like(module, "lockorder_holds")(2)
    h["addr"] = [LO_ADDR["kvm->mmu_lock"], LO_ADDR["kvm->mmu_lock"]]
    h["kind"] = {v: k for k, v in lo.KINDS.items()}["write"]
    h["stack_id"] = -1
    h["count"], h["total_ns"], h["max_ns"] = [3, 1], [3000, 70000], [1000, 70000]
    h["hist"][0, int(np.log2(1000)) + 1] = 3        # bpf/kmaps.h: slot floor(log2)+1
    h["hist"][1, int(np.log2(70000)) + 1] = 1
    agg = np.zeros(2, [("lock_addr", "u8"), ("count", "u8"), ("total_ns", "u8")])
    agg["lock_addr"], agg["count"], agg["total_ns"] = [LO_ADDR["kvm->mmu_lock"], 0x1], \
        [4, 9], [500, 900]
    w = Writer(tmp_path / "h.parquet")
    w.append("lockorder_holds", to_arrow(h))
    w.snapshot("aggregates", to_arrow(agg))
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {},
                "lock_names": {f"{LO_ADDR['kvm->mmu_lock']:#x}": {"name": "kvm(7)->mmu_lock"}}})
    (r,) = lo.holds(kvmlockprof.load(tmp_path / "h.parquet")).itertuples()
    assert (r.lock_class, r.kind, r.count, r.total_ns, r.max_ns) == \
        ("kvm->mmu_lock", "write", 4, 73000, 70000)
    assert r.p50_ns_bound == 2 ** np.ceil(np.log2(1000))
    assert r.p99_ns_bound == 2 ** np.ceil(np.log2(70000))
    assert (r.class_waits, r.class_wait_ns) == (4, 500)


def test_lockorder_holds_joined_to_the_waits_they_caused(module, tmp_path):
    """The BPF's join (lockorder_caused, keyed as the holds are) on the hold rows, and
    the waits no exclusive holder was seen for as a row of their own."""
    from kvmlockprof.probes import lockorder as lo
    write = {v: k for k, v in lo.KINDS.items()}["write"]
    h = empty_like(module, "lockorder_holds")(1)
    h["addr"], h["kind"], h["stack_id"] = LO_ADDR["kvm->mmu_lock"], write, -1
    h["count"], h["total_ns"], h["max_ns"] = 2, 5000, 3000
    c = empty_like(module, "lockorder_caused")(2)
    c["addr"] = LO_ADDR["kvm->mmu_lock"]
    c["kind"], c["stack_id"] = [write, lo.NO_HOLDER], -1
    c["count"], c["total_ns"] = [3, 2], [900, 100]
    w = Writer(tmp_path / "c.parquet")
    w.append("lockorder_holds", to_arrow(h))
    w.append("lockorder_caused", to_arrow(c))
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {},
                "lock_names": {f"{LO_ADDR['kvm->mmu_lock']:#x}": {"name": "kvm(7)->mmu_lock"}}})
    out = lo.holds(kvmlockprof.load(tmp_path / "c.parquet")).set_index("kind")
    assert out.loc["write", ["count", "total_ns", "waits_caused", "wait_ns_caused"]].tolist() \
        == [2, 5000, 3, 900]
    assert out.loc["no exclusive holder", ["count", "waits_caused", "wait_ns_caused"]] \
        .tolist() == [0, 2, 100]


def test_the_calls_the_kernel_skipped_are_each_probes_and_said(module, tmp_path, monkeypatch):
    """A function program the kernel did not run for a call (recursion_misses: a kprobe
    hit inside another kprobe program on that CPU) is counted for every probe it
    serves (lost_recursion), and lockorder's findings say its view has such gaps."""
    from kvmlockprof.probes import functions, lockorder as lo
    monkeypatch.setattr(functions, "read_counters", lambda m, names: {n: 1 for n in names})
    monkeypatch.setattr(functions.bpfstats, "recursion_misses", lambda fd: {3: 400, 4: 8}[fd])
    fp = functions.FunctionProbes.__new__(functions.FunctionProbes)
    fp.plans, fp.bpf = {lo.PROBE: None}, {"kvmlp_counters": None}
    fp.prog_fds = lambda: {"kvmlp_kp_LOLS": (3, ("lockorder",)),
                           "kfunc__vmlinux__x": (4, ("lockorder", "srcu"))}
    c = fp.counters()
    assert c["lockorder"]["lost_recursion"] == 408 and c["srcu"] == {"lost_recursion": 8}
    rec = _lockorder_recording(module, tmp_path, "r.parquet", edges=[], acqs=[])
    rec.manifest["probe_counters"] = {"lockorder": {"lost_recursion": 408}}
    f = lo.findings(rec)
    assert list(f["finding"]) == ["incomplete"] and "408 lock calls" in f["seen"][0], f
