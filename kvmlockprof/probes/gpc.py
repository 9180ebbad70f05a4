"""gpc: gfn_to_pfn_cache refresh latency and result, check hits and misses,
activations, per cache, named by where it lives (bpf/gpc.bpf.c)."""

from kvmlockprof import cdefs
from kvmlockprof.lazy import np, pd
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import duration_s, stats

PLACES = cdefs.labels("gpc.bpf.c", "gpc_place", {
    "GPC_UNKNOWN": "?", "GPC_XEN_SHINFO": "kvm->arch.xen.shinfo_cache",
    "GPC_PV_TIME": "vcpu->arch.pv_time", "GPC_XEN_VCPU_INFO": "vcpu->arch.xen.vcpu_info_cache",
    "GPC_XEN_VCPU_TIME": "vcpu->arch.xen.vcpu_time_info_cache",
    "GPC_XEN_RUNSTATE": "vcpu->arch.xen.runstate_cache",
    "GPC_XEN_RUNSTATE2": "vcpu->arch.xen.runstate2_cache"})
OPS = cdefs.labels("gpc.bpf.c", "gpc_op", {
    "GPC_CHECK_MISS": "check_miss", "GPC_CHECK_HIT": "check_hit",
    "GPC_ACTIVATE": "activate", "GPC_DEACTIVATE": "deactivate"})
_OP = {v: k for k, v in OPS.items()}


def refreshes(rec):
    """Refresh latency per cache (named by place where known) and result."""
    df = rec.table("gpc_refresh")
    if df.empty:
        return df
    df = df.assign(place_name=df["place"].map(PLACES).fillna("?"), ok=df["ret"] == 0)
    return stats(df, ["tgid", "kvm", "gpc", "place_name", "ok"], "lat_ns")


def checks(rec):
    """Per cache: check hits, misses, the hit ratio, activations and deactivations."""
    df = rec.table("gpc_ops")
    cols = ["check_hit", "check_miss", "activate", "deactivate"]
    if df.empty:
        return pd.DataFrame(columns=["tgid", "kvm", "gpc", "place_name", *cols, "hit_ratio"])
    df = df.assign(op_name=df["op"].map(OPS), place_name=df["place"].map(PLACES))
    out = df.pivot_table(index=["tgid", "kvm", "gpc", "place_name"], columns="op_name",
                         values="count", aggfunc="sum", fill_value=0)
    for c in cols:
        if c not in out.columns:
            out[c] = 0
    n = out["check_hit"] + out["check_miss"]
    out["hit_ratio"] = np.where(n > 0, out["check_hit"] / n.where(n > 0, 1), np.nan)
    return out[cols + ["hit_ratio"]].reset_index()


def _checks_figure(rec):
    import plotly.express as px
    c = checks(rec)
    if c.empty:
        return None
    c = c.groupby("place_name")[["check_hit", "check_miss", "activate"]].sum()
    c = c.reset_index().melt(id_vars="place_name", var_name="op", value_name="count")
    return px.bar(c, x="place_name", y="count", color="op", barmode="group")


def _refresh_figure(rec):
    import plotly.express as px
    ref = rec.table("gpc_refresh")
    if ref.empty:
        return None
    r = ref.assign(cache=ref["place"].map(PLACES).fillna("?"))
    return px.histogram(r, x="lat_ns", color="cache", log_y=True, nbins=60,
                        labels={"lat_ns": "refresh latency (ns)"})


def compare_values(rec):
    out = {}
    c = checks(rec)
    for place, p in (c.groupby("place_name") if not c.empty else ()):
        n = p["check_hit"].sum() + p["check_miss"].sum()
        if n:
            out[(f"gpc check hit ratio {place}", "higher", "ratio")] = p["check_hit"].sum() / n
    ref = rec.table("gpc_refresh")
    if not ref.empty:
        out[("gpc refreshes/s", "lower", "/s")] = len(ref) / duration_s(rec)
        out[("gpc refresh mean latency", "lower", "ns")] = float(ref["lat_ns"].mean())
    return out


def top_ratios(batches, snaps):
    """Check hits of all checks since the start (the in-kernel aggregate's totals)."""
    ops = snaps.get("gpc_ops")
    if ops is None or not ops.num_rows:
        return {}
    df = ops.to_pandas()
    hit = int(df.loc[df["op"] == _OP["check_hit"], "count"].sum())
    miss = int(df.loc[df["op"] == _OP["check_miss"], "count"].sum())
    return {"gpc check": (hit, hit + miss, True)}


PROBE = Probe(
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
    tables=("gpc_refresh", "gpc_ops"),
    columns={"gpc_ops": {"tgid": "n", "kvm": "n", "gpc": "n", "place": "n", "op": "n",
                         "count": "n"},
             "gpc_refresh": {"tgid": "n", "kvm": "n", "gpc": "n", "place": "n", "ret": "n",
                             "lat_ns": "n"}},
    streams=(("gpc_events", "gpc_refresh"),),
    aggregates=(("gpc_ops", "gpc_ops"),),
    fields={"GPC_KVM": ("gfn_to_pfn_cache", "kvm"), "GPC_GPA": ("gfn_to_pfn_cache", "gpa"),
            "GPC_VCPU": ("gfn_to_pfn_cache", "vcpu"),          # 6.1: no gpc->kvm yet
            "VCPU_KVM": ("kvm_vcpu", "kvm"),
            "PV_TIME": ("kvm_vcpu", "arch.pv_time"),
            "XEN_VCPU_INFO": ("kvm_vcpu", "arch.xen.vcpu_info_cache"),
            "XEN_VCPU_TIME": ("kvm_vcpu", "arch.xen.vcpu_time_info_cache"),
            "XEN_RUNSTATE": ("kvm_vcpu", "arch.xen.runstate_cache"),
            "XEN_RUNSTATE2": ("kvm_vcpu", "arch.xen.runstate2_cache"),
            "XEN_SHINFO": ("kvm", "arch.xen.shinfo_cache")},
    sections=(Section("gpc_checks", "gfn_to_pfn_cache checks per cache", checks,
                      _checks_figure, hex=("kvm", "gpc")),
              Section("gpc_refresh", "gfn_to_pfn_cache refreshes", refreshes,
                      _refresh_figure, hex=("kvm", "gpc"))),
    compare=compare_values,
    top=top_ratios,
)
