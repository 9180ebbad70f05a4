"""Analysis of the function probes' tables: DataFrames in, DataFrames out.

The label tables mirror the enums of the BPF C (named beside each)."""
import errno

import numpy as np
import pandas as pd

from .analysis import hist_quantile

# xen_evtchn.bpf.c: the return value of kvm_xen_set_evtchn_fast()
XEN_OUTCOMES = {1: "delivered", 0: "already pending", -errno.ENOTCONN: "masked",
                -errno.EINVAL: "bad port/vcpu", -errno.EWOULDBLOCK: "fell back (slow path)"}
# gpc.bpf.c: enum gpc_place / enum gpc_op
GPC_PLACES = {0: "?", 1: "kvm->arch.xen.shinfo_cache", 2: "vcpu->arch.pv_time",
              3: "vcpu->arch.xen.vcpu_info_cache", 4: "vcpu->arch.xen.vcpu_time_info_cache",
              5: "vcpu->arch.xen.runstate_cache", 6: "vcpu->arch.xen.runstate2_cache"}
GPC_OPS = {0: "check_miss", 1: "check_hit", 2: "activate", 3: "deactivate"}
# srcu.bpf.c: enum srcu_kind / enum srcu_event_type
SRCU_KINDS = {0: "other", 1: "kvm->srcu", 2: "kvm->irq_srcu"}
SRCU_EVENTS = {0: "read_section", 1: "synchronize_srcu", 2: "synchronize_srcu_expedited"}
# xarray.bpf.c: enum xa_owner
XA_OWNERS = {0: "other", 1: "kvm->vcpu_array", 2: "kvm->arch.vgic.lpi_xa",
             3: "kvm->vcpu_array (at its caller)"}


def _stats(df, keys, col):
    """count, total, mean, p50, p99 (numpy, linear), max of `col` per group."""
    g = df.groupby(keys)[col]
    return pd.DataFrame({"count": g.size(), "total_ns": g.sum(), "mean_ns": g.mean(),
                         "p50_ns": g.quantile(0.5), "p99_ns": g.quantile(0.99),
                         "max_ns": g.max()}).reset_index()


def xen_outcomes(rec):
    """One row per kvm_xen_set_evtchn{,_fast} call with its outcome named."""
    df = rec.table("xen_evtchn")
    if df.empty:
        return df
    df = df.copy()
    df["outcome"] = df["ret"].map(XEN_OUTCOMES).fillna("error " + df["ret"].astype(str))
    df["path"] = np.where(df["slow"] == 1, "slow", "fast")
    return df


def xen_hit_ratio(rec):
    """Fast-path hit ratio per VM: the share of fast-path calls that did not fall back."""
    df = xen_outcomes(rec)
    if df.empty:
        return pd.DataFrame(columns=["tgid", "kvm", "fast_calls", "fell_back", "hit_ratio",
                                     "slow_calls"])
    fast = df[df["path"] == "fast"]
    g = fast.groupby(["tgid", "kvm"])
    out = pd.DataFrame({"fast_calls": g.size(),
                        "fell_back": g["ret"].apply(lambda r: int((r == -errno.EWOULDBLOCK).sum()))})
    out["hit_ratio"] = 1 - out["fell_back"] / out["fast_calls"]
    slow = df[df["path"] == "slow"].groupby(["tgid", "kvm"]).size()
    out["slow_calls"] = slow.reindex(out.index).fillna(0).astype(int)
    return out.reset_index()


def gpc_refreshes(rec):
    """Refresh latency per cache (named by place where known) and result."""
    df = rec.table("gpc_refresh")
    if df.empty:
        return df
    df = df.assign(place_name=df["place"].map(GPC_PLACES).fillna("?"),
                   ok=df["ret"] == 0)
    return _stats(df, ["tgid", "kvm", "gpc", "place_name", "ok"], "lat_ns")


def gpc_checks(rec):
    """Per cache: check hits, misses, the hit ratio, activations and deactivations."""
    df = rec.table("gpc_ops")
    cols = ["check_hit", "check_miss", "activate", "deactivate"]
    if df.empty:
        return pd.DataFrame(columns=["tgid", "kvm", "gpc", "place_name", *cols, "hit_ratio"])
    df = df.assign(op_name=df["op"].map(GPC_OPS), place_name=df["place"].map(GPC_PLACES))
    out = df.pivot_table(index=["tgid", "kvm", "gpc", "place_name"], columns="op_name",
                         values="count", aggfunc="sum", fill_value=0)
    for c in cols:
        if c not in out.columns:
            out[c] = 0
    checks = out["check_hit"] + out["check_miss"]
    out["hit_ratio"] = np.where(checks > 0, out["check_hit"] / checks.where(checks > 0, 1),
                                np.nan)
    return out[cols + ["hit_ratio"]].reset_index()


def srcu_sections(rec):
    """Read-section lengths per srcu_struct (in-kernel log2 histograms: p50/p99
    are bucket upper bounds)."""
    df = rec.table("srcu_sections")
    if df.empty:
        return df
    rows = []
    for r in df.itertuples(index=False):
        rows.append({"ssp": r.ssp, "kvm": r.kvm, "kind": SRCU_KINDS.get(r.kind, "?"),
                     "count": r.count, "total_ns": r.total_ns,
                     "mean_ns": r.total_ns / r.count if r.count else np.nan,
                     "p50_ns_bound": hist_quantile(r.hist, 0.5),
                     "p99_ns_bound": hist_quantile(r.hist, 0.99), "max_ns": r.max_ns})
    return pd.DataFrame(rows).sort_values("total_ns", ascending=False, ignore_index=True)


def srcu_syncs(rec):
    """synchronize_srcu{,_expedited} waits per srcu_struct and caller."""
    df = rec.table("srcu_sync")
    if df.empty:
        return df
    df = df[df["type"] != 0]
    df = df.assign(kind_name=df["kind"].map(SRCU_KINDS), wait=df["type"].map(SRCU_EVENTS),
                   caller=_callers(rec, df["stack_id"], skip={"synchronize_srcu",
                                                              "synchronize_srcu_expedited"}))
    return _stats(df, ["wait", "kind_name", "ssp", "caller"], "dur_ns")


def xa_erases(rec):
    """xa_erase count and latency per owner and caller (from the in-kernel aggregate)."""
    df = rec.table("xa_erase_agg")
    if df.empty:
        return df
    df = df.assign(owner_name=df["owner"].map(XA_OWNERS),
                   caller=_callers(rec, df["stack_id"], skip={"xa_erase"}))
    g = df.groupby(["owner_name", "kvm", "caller"])
    out = pd.DataFrame({"count": g["count"].sum(), "total_ns": g["total_ns"].sum(),
                        "max_ns": g["max_ns"].max()}).reset_index()
    out["mean_ns"] = out["total_ns"] / out["count"]
    return out.sort_values("count", ascending=False, ignore_index=True)


def vgic_puts(rec):
    df = rec.table("vgic")
    if df.empty:
        return df
    df = df.assign(lpi=(df["intid"] >= 8192) & (df["intid"] != 0xFFFFFFFF),
                   released=df["refcount"] == 1,
                   irqs_off=df["irqs_off"].map({0: "on", 1: "off", 2: "unknown"}))
    return _stats(df, ["tgid", "kvm", "lpi", "released", "irqs_off"], "lat_ns")


def _callers(rec, stack_ids, skip):
    """First frame of each function-probe stack that is not the probed function
    itself nor probe machinery (kprobe/trampoline frames)."""
    st = rec.stacks
    if st.empty:
        return pd.Series(["?"] * len(stack_ids), index=stack_ids.index)
    if "source" in st.columns:
        st = st[st["source"] == "functions"]
    first = {}
    for sid, frames in zip(st["stack_id"], st["frames"]):
        for f in frames:
            name = f.split("+", 1)[0]
            if name in skip or name.startswith(("bpf_", "kprobe", "ftrace", "0x")):
                continue
            first[int(sid)] = f
            break
    return stack_ids.map(lambda s: first.get(int(s), "?"))
