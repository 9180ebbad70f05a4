"""The probe catalog: one declarative entry per probe.

The loader, doctor and `probes` command read this table; adding a probe means
adding an entry and its BPF C file, never a special case elsewhere.
"""
from dataclasses import dataclass, field

# Attach methods, in the order a probe prefers them.
TRACEPOINT = "tracepoint"
FENTRY = "fentry"
KPROBE = "kprobe"


@dataclass(frozen=True)
class Target:
    """A kernel function (or tracepoint) a probe hooks, with its older names."""
    symbols: tuple                 # newest first: the first one present is used
    methods: tuple                 # attach methods this target allows, preferred first
    why_limited: str = ""          # why some methods are impossible for it

    @property
    def name(self):
        return self.symbols[0]


@dataclass(frozen=True)
class Probe:
    name: str
    summary: str
    targets: tuple
    bpf: str = ""                  # file under bpf/; "" = catalogued, not built yet
    arch: tuple = ("x86_64", "aarch64")
    metrics: tuple = ()
    tables: tuple = ()             # recording tables it fills
    needs: tuple = ()              # other requirements, e.g. CONFIG options
    notes: str = ""


CATALOG = (
    Probe(
        name="contention",
        summary="every contended kernel lock: wait time, lock type, stack, task",
        targets=(Target(("lock:contention_begin",), (TRACEPOINT,)),
                 Target(("lock:contention_end",), (TRACEPOINT,))),
        bpf="contention.bpf.c",
        metrics=("count", "total_wait", "max_wait", "min_wait", "wait_hist_log2",
                 "samples"),
        tables=("contention", "aggregates", "stacks"),
    ),
    Probe(
        name="xen_evtchn",
        summary="Xen event-channel fast path: delivered / pending / masked / fell back",
        targets=(Target(("kvm_xen_set_evtchn_fast",), (FENTRY, KPROBE)),
                 Target(("kvm_xen_set_evtchn",), (FENTRY, KPROBE))),
        arch=("x86_64",),
        needs=("CONFIG_KVM_XEN",),
        metrics=("outcome", "latency", "hit_ratio"),
    ),
    Probe(
        name="gpc",
        summary="gfn_to_pfn_cache refresh latency, check hit ratio, activate/deactivate",
        targets=(Target(("kvm_gpc_refresh", "kvm_gfn_to_pfn_cache_refresh"), (FENTRY, KPROBE)),
                 Target(("kvm_gpc_check", "kvm_gfn_to_pfn_cache_check"), (FENTRY, KPROBE)),
                 Target(("kvm_gpc_activate", "kvm_gpc_init"), (FENTRY, KPROBE)),
                 Target(("kvm_gpc_deactivate", "kvm_gfn_to_pfn_cache_destroy"),
                        (FENTRY, KPROBE))),
        metrics=("refresh_latency", "refresh_result", "check_hit_ratio"),
    ),
    Probe(
        name="vgic",
        summary="arm64 vgic_put_irq: count, latency, LPI or not, released or not",
        targets=(Target(("vgic_put_irq",), (FENTRY, KPROBE)),),
        arch=("aarch64",),
        metrics=("count", "latency", "lpi", "released"),
    ),
    Probe(
        name="xarray",
        summary="xa_erase latency and caller, KVM-owned xarrays told apart",
        targets=(Target(("xa_erase",), (KPROBE,),
                        why_limited="lib/ is built without ftrace hooks: no fentry"),),
        metrics=("latency", "caller", "kvm_owned"),
    ),
    Probe(
        name="srcu",
        summary="SRCU read-section lengths and synchronize_srcu* grace-period waits",
        targets=(Target(("__srcu_read_lock",), (FENTRY, KPROBE)),
                 Target(("__srcu_read_unlock",), (FENTRY, KPROBE)),
                 Target(("synchronize_srcu",), (FENTRY, KPROBE)),
                 Target(("synchronize_srcu_expedited",), (FENTRY, KPROBE))),
        metrics=("read_section_hist", "sync_wait"),
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
