"""srcu: SRCU read-section lengths per srcu_struct (kvm->srcu, kvm->irq_srcu told
apart) and the synchronize_srcu* grace-period waits (bpf/srcu.bpf.c)."""

from kvmlockprof import cdefs
from kvmlockprof.lazy import np, pd
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import callers, stats
from kvmlockprof.quantiles import hist_quantile, quantiles

KINDS = cdefs.labels("srcu.bpf.c", "srcu_kind", {
    "SRCU_OTHER": "other", "SRCU_KVM": "kvm->srcu", "SRCU_KVM_IRQ": "kvm->irq_srcu"})
EVENTS = cdefs.labels("srcu.bpf.c", "srcu_event_type", {
    "SRCU_EV_SECTION": "read_section", "SRCU_EV_SYNC": "synchronize_srcu",
    "SRCU_EV_SYNC_EXP": "synchronize_srcu_expedited"})
_SECTION = cdefs.enum("srcu.bpf.c", "srcu_event_type")["SRCU_EV_SECTION"]


def sections(rec):
    """Read-section lengths per srcu_struct (in-kernel log2 histograms: p50/p99
    are bucket upper bounds)."""
    df = rec.table("srcu_sections")
    if df.empty:
        return df
    rows = []
    for r in df.itertuples(index=False):
        rows.append({"ssp": r.ssp, "kvm": r.kvm, "kind": KINDS.get(r.kind, "?"),
                     "count": r.count, "total_ns": r.total_ns,
                     "mean_ns": r.total_ns / r.count if r.count else np.nan,
                     "p50_ns_bound": hist_quantile(r.hist, 0.5),
                     "p99_ns_bound": hist_quantile(r.hist, 0.99), "max_ns": r.max_ns})
    return pd.DataFrame(rows).sort_values("total_ns", ascending=False, ignore_index=True)


def _grace_periods(rec):
    df = rec.table("srcu_sync")
    return df[df["type"] != _SECTION] if not df.empty else df


def syncs(rec):
    """synchronize_srcu{,_expedited} waits per srcu_struct and caller."""
    df = _grace_periods(rec)
    if df.empty:
        return df
    df = df.assign(kind_name=df["kind"].map(KINDS), wait=df["type"].map(EVENTS),
                   caller=callers(rec, df["stack_id"], skip={"synchronize_srcu",
                                                             "synchronize_srcu_expedited"}))
    return stats(df, ["wait", "kind_name", "ssp", "caller"], "dur_ns")


def _sections_figure(rec):
    import plotly.express as px
    from kvmlockprof.analysis.locks import hist_frame
    sec = rec.table("srcu_sections")
    if sec.empty:
        return None
    kinds = sec.assign(kind=sec["kind"].map(KINDS).fillna("?"))
    h = hist_frame([(k, np.sum(np.stack(p["hist"].to_numpy()), axis=0))
                    for k, p in kinds.groupby("kind")])
    return px.bar(h, x="lo_ns", y="count", color="what", barmode="group", log_x=True,
                  labels={"lo_ns": "read section (ns, log2 bucket lower bound)",
                          "what": "srcu_struct"})


def _syncs_figure(rec):
    import plotly.express as px
    s = _grace_periods(rec)
    if s.empty:
        return None
    s = s.assign(wait=s["type"].map(EVENTS), srcu=s["kind"].map(KINDS))
    return px.histogram(s, x="dur_ns", color="wait", facet_col="srcu", log_y=True, nbins=60,
                        labels={"dur_ns": "wait in synchronize_srcu* (ns)"})


def compare_values(rec):
    out = {}
    sec = rec.table("srcu_sections")
    if not sec.empty:
        for kind, p in sec.assign(kind=sec["kind"].map(KINDS)).groupby("kind"):
            if p["count"].sum():
                out[(f"srcu read section mean {kind}", "lower", "ns")] = \
                    p["total_ns"].sum() / p["count"].sum()
    sync = _grace_periods(rec)
    ops = (rec.manifest.get("work") or {}).get("churn_ops") or 0
    for (typ, kind), p in (sync.groupby(["type", "kind"]) if not sync.empty else ()):
        what = f"{EVENTS[typ]} {KINDS.get(kind)}"
        out[(f"{what} mean wait", "lower", "ns")] = float(p["dur_ns"].mean())
        out[(f"{what} p99 wait", "lower", "ns")] = float(quantiles(p["dur_ns"].to_numpy(), 0.99))
        if ops:
            out[(f"{what} per memslot op", "lower", "")] = len(p) / ops
    return out


PROBE = Probe(
    name="srcu",
    fires="per SRCU read section of every SRCU user (kvm->srcu: every exit), per "
          "synchronize_srcu*",
    summary="SRCU read-section lengths and synchronize_srcu* grace-period waits",
    opt_in="two calls a vCPU exit: at fentry's ~50 ns a call, over 2% of an "
           "exit-heavy guest by arithmetic (bench/README.md, probe_cost.py)",
    targets=(Target("SRCU_LOCK", ("__srcu_read_lock",), (FENTRY, KPROBE), ("ssp",),
                    {"__srcu_read_lock": ("ssp",)}),
             Target("SRCU_UNLOCK", ("__srcu_read_unlock",), (FENTRY, KPROBE), ("ssp",),
                    {"__srcu_read_unlock": ("ssp", "idx")}),
             Target("SYNC", ("synchronize_srcu",), (FENTRY, KPROBE), ("ssp",),
                    {"synchronize_srcu": ("ssp",)}, ret=True),
             Target("SYNC_EXP", ("synchronize_srcu_expedited",), (FENTRY, KPROBE),
                    ("ssp",), {"synchronize_srcu_expedited": ("ssp",)}, ret=True)),
    bpf="srcu.bpf.c",
    tables=("srcu_sync", "srcu_sections"),
    columns={"srcu_sections": {"ssp": "n", "kvm": "n", "kind": "n", "count": "n",
                               "total_ns": "n", "max_ns": "n", "hist": "l"},
             "srcu_sync": {"type": "n", "kind": "n", "ssp": "n", "dur_ns": "n",
                           "stack_id": "n"}},
    streams=(("srcu_events", "srcu_sync"),),
    aggregates=(("srcu_sections", "srcu_sections"),),
    fields={"KVM_SRCU": ("kvm", "srcu"), "KVM_IRQ_SRCU": ("kvm", "irq_srcu")},
    # one read section in this many streamed with its caller (all are in the histograms)
    defines={"KVMLP_SRCU_SAMPLE_EVERY": 64},
    sections=(Section("srcu_sections", "SRCU read sections per srcu_struct (p50/p99: log2 "
                      "bucket bounds)", sections, _sections_figure, hex=("kvm", "ssp")),
              Section("srcu_sync", "SRCU grace-period waits", syncs, _syncs_figure,
                      hex=("ssp",))),
    compare=compare_values,
)
