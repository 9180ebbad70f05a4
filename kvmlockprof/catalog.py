"""The probe catalog: one declarative entry per probe.

The loader, doctor, `probes` and `record` read this table; adding a probe means
adding an entry and its BPF C file under bpf/, never a special case elsewhere.

For a function probe, each Target names the kernel function (newest name first,
older aliases after), the attach methods it allows in order of preference, the
parameters the C reads (their positions come from BTF, else from `signatures`),
and whether a return handler is needed. The C sees, per target KEY:
KVMLP_M_KEY (method: 0 off, 1 fentry/fexit, 2 kprobe/kretprobe, 3 fentry/fexit on a
symbol several targets share), KVMLP_S_KEY (the
symbol), KVMLP_N_KEY (argument count), KVMLP_A_KEY_PARAM (argument index or -1).
Struct field offsets (`fields`) reach it as KVMLP_OFF_NAME, -1 where BTF lacks one.
"""
from dataclasses import dataclass, field

TRACEPOINT = "raw_tracepoint"    # never perf-attached: see bpf/contention.bpf.c
FENTRY = "fentry"
KPROBE = "kprobe"
METHOD_CODE = {None: 0, FENTRY: 1, KPROBE: 2}


@dataclass(frozen=True, eq=False)   # catalog entries are singletons: hash by identity
class Target:
    key: str                       # C macro suffix
    symbols: tuple                 # newest name first: the first one present is used
    methods: tuple                 # attach methods allowed, preferred first
    params: tuple = ()             # parameter names the C reads
    signatures: dict = field(default_factory=dict)   # symbol -> parameter names (no BTF)
    ret: bool = False              # needs a return handler
    optional: bool = False         # the probe still works without this target
    why_limited: str = ""          # why some methods are impossible for it

    @property
    def name(self):
        return self.symbols[0]


@dataclass(frozen=True, eq=False)   # catalog entries are singletons: hash by identity
class Probe:
    name: str
    summary: str
    targets: tuple
    bpf: str = ""
    arch: tuple = ("x86_64", "aarch64")
    metrics: tuple = ()
    tables: tuple = ()             # recording tables it fills
    streams: tuple = ()            # (ring buffer map, recording table)
    aggregates: tuple = ()         # (in-kernel map, recording table), snapshotted
    counters: tuple = ()           # names of <name>_counters entries, in order
    fields: dict = field(default_factory=dict)      # KVMLP_OFF_X -> (struct, field path)
    needs: tuple = ()              # kernel config a probe needs, for the why-not
    notes: str = ""
    fires: str = ""                # how often its programs run: its cost class
    # Why plain record/top leave it off (its measured cost, bench/README.md "Function
    # probe costs"); "" : on by default. --probes attaches it.
    opt_in: str = ""


_FILP = {"kvm_vm_ioctl": ("filp", "ioctl", "arg"), "kvm_vcpu_ioctl": ("filp", "ioctl", "arg")}

CATALOG = (
    Probe(
        name="contention",
        fires="per contended wait (two programs)",
        summary="every contended kernel lock: wait time, lock type, stack, task",
        targets=(Target("CONTENTION_BEGIN", ("lock:contention_begin",), (TRACEPOINT,)),
                 Target("CONTENTION_END", ("lock:contention_end",), (TRACEPOINT,))),
        bpf="contention.bpf.c",
        metrics=("count", "total_wait", "max_wait", "min_wait", "wait_hist_log2", "samples"),
        tables=("contention", "aggregates", "stacks"),
    ),
    Probe(
        name="vms",
        fires="per VM and vCPU ioctl (KVM_RUN: per exit to user space), per VM or vCPU "
              "made or destroyed",
        summary="learn VMs (struct kvm) and vCPUs with their owning process and thread, "
                "and when each is destroyed",
        targets=(Target("VM_IOCTL", ("kvm_vm_ioctl",), (FENTRY, KPROBE), ("filp",), _FILP),
                 Target("VCPU_IOCTL", ("kvm_vcpu_ioctl",), (FENTRY, KPROBE), ("filp", "ioctl"),
                        _FILP),
                 # Lifetimes: without these the first owner seen keeps an address for
                 # the whole session, even once the kernel reuses it for another VM.
                 Target("VM_CREATE", ("kvm_arch_init_vm",), (FENTRY, KPROBE), ("kvm",),
                        {"kvm_arch_init_vm": ("kvm", "type")}, optional=True),
                 Target("VM_DESTROY", ("kvm_destroy_vm", "kvm_arch_destroy_vm"),
                        (FENTRY, KPROBE), ("kvm",),
                        {"kvm_destroy_vm": ("kvm",), "kvm_arch_destroy_vm": ("kvm",)},
                        ret=True, optional=True),
                 Target("VCPU_CREATE", ("kvm_arch_vcpu_postcreate",), (FENTRY, KPROBE),
                        ("vcpu",), {"kvm_arch_vcpu_postcreate": ("vcpu",)}, optional=True),
                 Target("VCPU_TEARDOWN", ("kvm_arch_vcpu_destroy",), (FENTRY, KPROBE),
                        ("vcpu",), {"kvm_arch_vcpu_destroy": ("vcpu",)}, optional=True)),
        bpf="vms.bpf.c",
        metrics=("vm_pid", "vcpu_thread", "lifetimes"),
        tables=("vms", "vcpus"),
        counters=("vms_created", "vms_destroyed", "vcpus_created", "vcpus_destroyed",
                  "lost_pending_full"),
        fields={"FILE_PRIVATE_DATA": ("file", "private_data"),
                "VCPU_KVM": ("kvm_vcpu", "kvm"), "VCPU_IDX": ("kvm_vcpu", "vcpu_idx"),
                "VCPU_ID": ("kvm_vcpu", "vcpu_id")},
    ),
    Probe(
        name="xen_evtchn",
        fires="per Xen event-channel send",
        summary="Xen event-channel fast path: delivered / pending / masked / fell back",
        targets=(Target("XEN_FAST", ("kvm_xen_set_evtchn_fast",), (FENTRY, KPROBE),
                        ("xe", "kvm"), {"kvm_xen_set_evtchn_fast": ("xe", "kvm")}, ret=True),
                 Target("XEN_SLOW", ("kvm_xen_set_evtchn",), (FENTRY, KPROBE),
                        ("xe", "kvm"), {"kvm_xen_set_evtchn": ("xe", "kvm")}, ret=True,
                        optional=True)),
        bpf="xen_evtchn.bpf.c",
        arch=("x86_64",),
        needs=("CONFIG_KVM_XEN",),
        metrics=("outcome", "latency", "hit_ratio"),
        tables=("xen_evtchn",),
        streams=(("xen_events", "xen_evtchn"),),
        counters=("calls", "lost_ringbuf_full", "lost_pending_full"),
        fields={"XE_PORT": ("kvm_xen_evtchn", "port"),
                "XE_VCPU_ID": ("kvm_xen_evtchn", "vcpu_id")},
    ),
    Probe(
        name="gpc",
        fires="per gfn_to_pfn_cache check (guest entries that use a cache), refresh or "
              "(de)activation",
        summary="gfn_to_pfn_cache refresh latency, check hit ratio, activate/deactivate",
        targets=(
            Target("GPC_REFRESH", ("kvm_gpc_refresh", "kvm_gfn_to_pfn_cache_refresh"),
                   (FENTRY, KPROBE), ("gpc",),
                   {"kvm_gpc_refresh": ("gpc", "len"),
                    "kvm_gfn_to_pfn_cache_refresh": ("kvm", "gpc", "gpa", "len")}, ret=True),
            Target("GPC_CHECK", ("kvm_gpc_check", "kvm_gfn_to_pfn_cache_check"),
                   (FENTRY, KPROBE), ("gpc",),
                   {"kvm_gpc_check": ("gpc", "len"),
                    "kvm_gfn_to_pfn_cache_check": ("kvm", "gpc", "gpa", "len")}, ret=True),
            Target("GPC_ACTIVATE", ("kvm_gpc_activate",), (FENTRY, KPROBE), ("gpc",),
                   {"kvm_gpc_activate": ("gpc", "gpa", "len")}, optional=True),
            Target("GPC_DEACTIVATE", ("kvm_gpc_deactivate",), (FENTRY, KPROBE), ("gpc",),
                   {"kvm_gpc_deactivate": ("gpc",)}, optional=True)),
        bpf="gpc.bpf.c",
        metrics=("refresh_latency", "refresh_result", "check_hit_ratio", "activations"),
        tables=("gpc_refresh", "gpc_ops"),
        streams=(("gpc_events", "gpc_refresh"),),
        aggregates=(("gpc_ops", "gpc_ops"),),
        counters=("refreshes", "checks", "lost_ringbuf_full", "lost_pending_full",
                  "lost_agg_full"),
        fields={"GPC_KVM": ("gfn_to_pfn_cache", "kvm"), "GPC_GPA": ("gfn_to_pfn_cache", "gpa"),
                "GPC_VCPU": ("gfn_to_pfn_cache", "vcpu"),          # 6.1: no gpc->kvm yet
                "VCPU_KVM": ("kvm_vcpu", "kvm"),
                "PV_TIME": ("kvm_vcpu", "arch.pv_time"),
                "XEN_VCPU_INFO": ("kvm_vcpu", "arch.xen.vcpu_info_cache"),
                "XEN_VCPU_TIME": ("kvm_vcpu", "arch.xen.vcpu_time_info_cache"),
                "XEN_RUNSTATE": ("kvm_vcpu", "arch.xen.runstate_cache"),
                "XEN_RUNSTATE2": ("kvm_vcpu", "arch.xen.runstate2_cache"),
                "XEN_SHINFO": ("kvm", "arch.xen.shinfo_cache")},
    ),
    Probe(
        name="vgic",
        fires="per vgic_put_irq (interrupt injection, LPIs)",
        summary="arm64 vgic_put_irq: count, latency, LPI or not, released or not",
        targets=(Target("VGIC_PUT", ("vgic_put_irq",), (FENTRY, KPROBE), ("kvm", "irq"),
                        {"vgic_put_irq": ("kvm", "irq")}, ret=True),),
        bpf="vgic.bpf.c",
        arch=("aarch64",),
        metrics=("count", "latency", "lpi", "released", "irqs_disabled"),
        tables=("vgic",),
        streams=(("vgic_events", "vgic"),),
        counters=("puts", "lost_ringbuf_full", "lost_pending_full"),
        fields={"IRQ_INTID": ("vgic_irq", "intid"),
                "IRQ_REFCOUNT": ("vgic_irq", "refcount.refs.counter")},
        notes="6.10 moved LPI refcounting into the xarray; later kernels changed it again: "
              "`released` is read from the refcount at entry where BTF has it",
    ),
    Probe(
        name="xarray",
        fires="per xa_erase anywhere in the kernel, per vCPU destroyed",
        summary="xa_erase latency and caller, KVM-owned xarrays told apart",
        targets=(Target("XA_ERASE", ("xa_erase",), (KPROBE,), ("xa",),
                        {"xa_erase": ("xa", "index")}, ret=True, optional=True,
                        why_limited="lib/ is built without ftrace hooks: no fentry, and "
                                    "kprobes only where CONFIG_KPROBE_EVENTS_ON_NOTRACE=y"),
                 # Where xa_erase cannot be probed, the vCPU-array erases are counted
                 # at their KVM caller: kvm_destroy_vcpus() erases each vCPU's slot
                 # right after kvm_vcpu_destroy() -> kvm_arch_vcpu_destroy().
                 Target("VCPU_DESTROY", ("kvm_arch_vcpu_destroy",), (FENTRY, KPROBE),
                        ("vcpu",), {"kvm_arch_vcpu_destroy": ("vcpu",)}, optional=True)),
        bpf="xarray.bpf.c",
        metrics=("latency", "caller", "kvm_owned"),
        tables=("xa_erase", "xa_erase_agg"),
        streams=(("xa_events", "xa_erase"),),
        aggregates=(("xa_agg", "xa_erase_agg"),),
        counters=("erases", "kvm_erases", "lost_ringbuf_full", "lost_pending_full",
                  "lost_agg_full", "vcpu_destroys"),
        fields={"VCPU_ARRAY": ("kvm", "vcpu_array"),
                "LPI_XA": ("kvm", "arch.vgic.lpi_xa"), "VCPU_KVM": ("kvm_vcpu", "kvm")},
    ),
    Probe(
        name="srcu",
        fires="per SRCU read section of every SRCU user (kvm->srcu: every exit), per "
              "synchronize_srcu*",
        summary="SRCU read-section lengths and synchronize_srcu* grace-period waits",
        opt_in="two calls a vCPU exit: at fentry's ~50 ns a call, over 2% of an "
               "exit-heavy guest by arithmetic; not yet measured (bench/probe_cost.py)",
        targets=(Target("SRCU_LOCK", ("__srcu_read_lock",), (FENTRY, KPROBE), ("ssp",),
                        {"__srcu_read_lock": ("ssp",)}),
                 Target("SRCU_UNLOCK", ("__srcu_read_unlock",), (FENTRY, KPROBE), ("ssp",),
                        {"__srcu_read_unlock": ("ssp", "idx")}),
                 Target("SYNC", ("synchronize_srcu",), (FENTRY, KPROBE), ("ssp",),
                        {"synchronize_srcu": ("ssp",)}, ret=True),
                 Target("SYNC_EXP", ("synchronize_srcu_expedited",), (FENTRY, KPROBE),
                        ("ssp",), {"synchronize_srcu_expedited": ("ssp",)}, ret=True)),
        bpf="srcu.bpf.c",
        metrics=("read_section_hist", "sync_wait"),
        tables=("srcu_sync", "srcu_sections"),
        streams=(("srcu_events", "srcu_sync"),),
        aggregates=(("srcu_sections", "srcu_sections"),),
        counters=("read_locks", "read_unlocks", "unpaired_unlocks", "syncs",
                  "lost_ringbuf_full", "lost_pending_full", "lost_agg_full"),
        fields={"KVM_SRCU": ("kvm", "srcu"), "KVM_IRQ_SRCU": ("kvm", "irq_srcu")},
    ),
)

BY_NAME = {p.name: p for p in CATALOG}


class UnknownProbe(ValueError):
    pass


def select(names):
    """Catalog entries by name; an unknown name lists the valid ones."""
    out = []
    for n in names:
        if n not in BY_NAME:
            raise UnknownProbe(f"unknown probe {n!r}; valid probes: {', '.join(BY_NAME)}")
        out.append(BY_NAME[n])
    return out


def resolve_symbol(target, symbols):
    """The first of the target's names (newest first) that this kernel has."""
    return next((s for s in target.symbols if s in symbols), None)
