"""vgic (arm64): vgic_put_irq's count and latency, LPI or not, whether the put
released the IRQ (erasing it from the LPI xarray, under its lock), its caller,
and its context: hardirq/softirq/task, IRQs off or on (bpf/vgic.bpf.c).
"From which contexts is lpi_xa's lock taken?" is `releases`:
a caller that releases with IRQs on beside one with IRQs off means the lock must
be taken with IRQs saved and disabled (xa_lock_irqsave), everywhere."""

from kvmlockprof import cdefs
from kvmlockprof.lazy import np, pd
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import CONTEXTS, IRQS, IRQS_OFF, callers, stats

MIN_LPI = cdefs.define("vgic.bpf.c", "VGIC_MIN_LPI")
INTID_UNKNOWN = cdefs.define("vgic.bpf.c", "VGIC_INTID_UNKNOWN")


def _events(rec):
    df = rec.table("vgic")
    if df.empty:
        return df
    return df.assign(lpi=(df["intid"] >= MIN_LPI) & (df["intid"] != INTID_UNKNOWN),
                     released=df["refcount"] == 1, irqs_off=df["irqs_off"].map(IRQS),
                     context=df["context"].map(CONTEXTS),
                     caller=callers(rec, df["stack_id"], skip={"vgic_put_irq"}))


def puts(rec):
    """vgic_put_irq latency per VM, LPI or not, last reference or not, IRQs on or off."""
    df = _events(rec)
    return df if df.empty else stats(df, ["tgid", "kvm", "lpi", "released", "irqs_off"],
                                     "lat_ns")


def contexts(rec):
    """Per caller of vgic_put_irq on LPIs: its context (task/softirq/hardirq, IRQs
    off or on), the puts and the releases (the LPI xarray erases, under its lock)."""
    df = _events(rec)
    if df.empty:
        return df
    df = df[df["lpi"]]
    g = df.groupby(["kvm", "caller", "context", "irqs_off"])
    return pd.DataFrame({"puts": g.size(), "releases": g["released"].sum(),
                         "distinct_lpis": g["intid"].nunique()}).reset_index() \
        .sort_values(["releases", "puts"], ascending=False, ignore_index=True)


def _figure(rec):
    import plotly.express as px
    vg = puts(rec)
    if vg.empty:
        return None
    v = vg.assign(what=np.where(vg["lpi"], "LPI", "SGI/PPI/SPI") +
                  np.where(vg["released"], ", last ref", ""))
    return px.bar(v, x="what", y="count", color="irqs_off",
                  hover_data=["p50_ns", "p99_ns", "max_ns"])


def _contexts_figure(rec):
    import plotly.express as px
    cx = contexts(rec)
    if cx.empty:
        return None
    cx = cx.assign(context_irqs=cx["context"] + ", IRQs " + cx["irqs_off"])
    return px.bar(cx, x="caller", y=["puts", "releases"], barmode="group",
                  facet_col="context_irqs", hover_data=["distinct_lpis"])


def compare_values(rec):
    vg = _events(rec)
    if vg.empty:
        return {}
    lpi = vg[vg["lpi"]]
    out = {("vgic_put_irq mean latency", "lower", "ns"): float(vg["lat_ns"].mean())}
    if len(lpi):
        on = ((lpi["irqs_off"] == "on") & lpi["released"]).sum()
        out[("LPI releases with IRQs on", "lower", "share")] = \
            float(on / max(1, lpi["released"].sum()))
    return out


def top_ratios(batches, snaps):
    """This interval's LPI puts taken with IRQs off, of all LPI puts."""
    vg = batches.get("vgic")
    if vg is None or not vg.size:
        return {}
    lpi = vg[(vg["intid"] >= MIN_LPI) & (vg["intid"] != INTID_UNKNOWN)]
    off = int((lpi["irqs_off"] == IRQS_OFF).sum())
    return {"LPI puts, IRQs off": (off, int(lpi.size), False)}


PROBE = Probe(
    name="vgic",
    fires="per vgic_put_irq (interrupt injection, LPIs)",
    summary="arm64 vgic_put_irq: count, latency, LPI or not, released or not",
    # kprobe first: only its saved PSTATE says whether IRQs were off, the point here.
    targets=(Target("VGIC_PUT", ("vgic_put_irq",), (KPROBE, FENTRY), ("kvm", "irq"),
                    {"vgic_put_irq": ("kvm", "irq")}, ret=True),),
    bpf="vgic.bpf.c",
    arch=("aarch64",),
    tables=("vgic",),
    columns={"vgic": {"tgid": "n", "kvm": "n", "intid": "n", "refcount": "n",
                      "irqs_off": "n", "context": "n", "stack_id": "n", "lat_ns": "n"}},
    streams=(("vgic_events", "vgic"),),
    fields={"IRQ_INTID": ("vgic_irq", "intid"),
            # refcount_t (6.10+), or a kref around one (before)
            "IRQ_REFCOUNT": ("vgic_irq", ("refcount.refs.counter",
                                          "refcount.refcount.refs.counter")),
            "TASK_PREEMPT": ("task_struct", "thread_info.preempt_count")},
    notes="6.10 moved LPI refcounting into the xarray; later kernels changed it again: "
          "`released` is read from the refcount at entry where BTF has it",
    sections=(Section("vgic", "vgic_put_irq", puts, _figure, hex=("kvm",)),
              Section("vgic_contexts", "LPI puts and releases (lpi_xa erases) by caller "
                      "and context", contexts, _contexts_figure, hex=("kvm",))),
    compare=compare_values,
    top=top_ratios,
)
