"""xarray: xa_erase latency and caller, the KVM-owned xarrays (the vCPU array, the
vgic LPI xarray) told apart, and vCPU-array erases counted at their KVM caller
where xa_erase cannot be probed (bpf/xarray.bpf.c)."""

from kvmlockprof import cdefs
from kvmlockprof.lazy import pd
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import callers

OWNERS = cdefs.labels("xarray.bpf.c", "xa_owner", {
    "XA_OTHER": "other", "XA_KVM_VCPU_ARRAY": "kvm->vcpu_array",
    "XA_KVM_LPI": "kvm->arch.vgic.lpi_xa",
    "XA_KVM_VCPU_ARRAY_BY_CALLER": "kvm->vcpu_array (at its caller)"})


def erases(rec):
    """xa_erase count and latency per owner and caller (from the in-kernel aggregate)."""
    df = rec.table("xa_erase_agg")
    if df.empty:
        return df
    df = df.assign(owner_name=df["owner"].map(OWNERS),
                   caller=callers(rec, df["stack_id"], skip={"xa_erase"}))
    g = df.groupby(["owner_name", "kvm", "caller"])
    out = pd.DataFrame({"count": g["count"].sum(), "total_ns": g["total_ns"].sum(),
                        "max_ns": g["max_ns"].max()}).reset_index()
    out["mean_ns"] = out["total_ns"] / out["count"]
    return out.sort_values("count", ascending=False, ignore_index=True)


def _figure(rec):
    import plotly.express as px
    xa = erases(rec)
    if xa.empty:
        return None
    return px.bar(xa.head(20), x="caller", y="count", color="owner_name",
                  hover_data=["mean_ns", "max_ns"])


def compare_values(rec):
    xa = erases(rec)
    return {(f"xa_erase mean latency {owner}", "lower", "ns"):
            p["total_ns"].sum() / p["count"].sum()
            for owner, p in (xa.groupby("owner_name") if not xa.empty else ())}


PROBE = Probe(
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
    tables=("xa_erase", "xa_erase_agg"),
    columns={"xa_erase_agg": {"owner": "n", "kvm": "n", "stack_id": "n", "count": "n",
                              "total_ns": "n", "max_ns": "n"}},
    streams=(("xa_events", "xa_erase"),),
    aggregates=(("xa_agg", "xa_erase_agg"),),
    fields={"VCPU_ARRAY": ("kvm", "vcpu_array"),
            "LPI_XA": ("kvm", "arch.vgic.lpi_xa"), "VCPU_KVM": ("kvm_vcpu", "kvm")},
    sections=(Section("xa_erase", "xa_erase by owner and caller", erases, _figure,
                      hex=("kvm",)),),
    compare=compare_values,
)
