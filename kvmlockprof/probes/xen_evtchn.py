"""xen_evtchn: the Xen event-channel fast path (kvm_xen_set_evtchn_fast), each
send's outcome, and the slow path it falls back to (bpf/xen_evtchn.bpf.c)."""
import errno

from kvmlockprof.lazy import np, pd
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import duration_s, vm_label

# kvm_xen_set_evtchn_fast()'s return values (the kernel's, not ours)
OUTCOMES = {1: "delivered", 0: "already pending", -errno.ENOTCONN: "masked",
            -errno.EINVAL: "bad port/vcpu", -errno.EWOULDBLOCK: "fell back (slow path)"}


def outcomes(rec):
    """One row per kvm_xen_set_evtchn{,_fast} call with its outcome named."""
    df = rec.table("xen_evtchn")
    if df.empty:
        return df
    df = df.copy()
    df["outcome"] = df["ret"].map(OUTCOMES).fillna("error " + df["ret"].astype(str))
    df["path"] = np.where(df["slow"] == 1, "slow", "fast")
    return df


def hit_ratio(rec):
    """Fast-path hit ratio per VM: the share of fast-path calls that did not fall back."""
    df = outcomes(rec)
    if df.empty:
        return pd.DataFrame(columns=["tgid", "kvm", "fast_calls", "fell_back", "hit_ratio",
                                     "slow_calls"])
    fast = df[df["path"] == "fast"]
    g = fast.groupby(["tgid", "kvm"])
    fell_back = g["ret"].apply(lambda r: int((r == -errno.EWOULDBLOCK).sum()))
    out = pd.DataFrame({"fast_calls": g.size(), "fell_back": fell_back})
    out["hit_ratio"] = 1 - out["fell_back"] / out["fast_calls"]
    slow = df[df["path"] == "slow"].groupby(["tgid", "kvm"]).size()
    out["slow_calls"] = slow.reindex(out.index).fillna(0).astype(int)
    return out.reset_index()


def _figure(rec):
    import plotly.express as px
    xen = hit_ratio(rec)
    if xen.empty:
        return None
    x = xen.assign(vm=xen["tgid"].map(vm_label(rec)).astype(str) + " " +
                   xen["kvm"].map(lambda k: f"{k:#x}"))
    return px.bar(x, x="vm", y="hit_ratio", range_y=[0, 1],
                  hover_data=["fast_calls", "fell_back", "slow_calls"])


def compare_values(rec):
    xen = hit_ratio(rec)
    if xen.empty:
        return {}
    calls, fell = xen["fast_calls"].sum(), xen["fell_back"].sum()
    return {("xen fast-path hit ratio", "higher", "ratio"): 1 - fell / calls if calls else np.nan,
            ("xen fast-path calls/s", "none", "/s"): calls / duration_s(rec)}


def top_ratios(batches, snaps):
    """This interval's fast-path sends that did not fall back, of all fast-path sends."""
    xen = batches.get("xen_evtchn")
    if xen is None or not xen.size:
        return {}
    fast = xen[xen["slow"] == 0]
    return {"xen fast path": (int((fast["ret"] != -errno.EWOULDBLOCK).sum()), int(fast.size),
                              False)}


PROBE = Probe(
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
    tables=("xen_evtchn",),
    columns={"xen_evtchn": {"tgid": "n", "kvm": "n", "ret": "n", "slow": "n"}},
    streams=(("xen_events", "xen_evtchn"),),
    fields={"XE_PORT": ("kvm_xen_evtchn", "port"),
            "XE_VCPU_ID": ("kvm_xen_evtchn", "vcpu_id")},
    sections=(Section("xen", "Xen event channels: fast-path hit ratio per VM", hit_ratio,
                      _figure, hex=("kvm",)),),
    compare=compare_values,
    top=top_ratios,
)
